# ModifyVolume and DescribeVolumesModifications as EC2 answers them.
#
# - A modification reports its state: "completed" at once (moto applies it
#   at once, and the world keeps no optimizing phase).
# - A volume can be modified once in six hours: a second ModifyVolume is
#   refused with VolumeModificationRateExceeded ("Requirements for EBS
#   volume modifications", EBS user guide: "you must wait at least six
#   hours ... before you can modify the same volume").
# - DescribeVolumesModifications naming a volume that was never modified is
#   refused with InvalidVolumeModification.NotFound ("Modification for
#   volume 'vol-...' does not exist."), as EC2 answers it (aws-sdk-rust
#   issue #1346, where a caller met exactly this); moto answered an empty
#   list. A filter that matches nothing still answers an empty list.
#
# moto 5.1.22 and 5.2.5 both lack the last two.

from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import elastic_block_store as moto_ebs


def install():
    backend = moto_ebs.EBSBackend
    moto_ebs.VolumeModification.modification_state = "completed"
    moto_ebs.VolumeModification.progress = 100
    modify = backend.modify_volume
    describe = backend.describe_volumes_modifications

    def modify_volume(self, volume_id, *args, **kwargs):
        volume = self.get_volume(volume_id)
        if volume.modifications:
            raise EC2ClientError(
                "VolumeModificationRateExceeded",
                "You've reached the maximum modification rate per volume limit. "
                f"Wait at least 6 hours between modifications per EBS volume ({volume_id}).",
            )
        return modify(self, volume_id, *args, **kwargs)

    def describe_volumes_modifications(self, volume_ids=None, filters=None):
        for volume_id in volume_ids or []:
            if not self.get_volume(volume_id).modifications:
                raise EC2ClientError(
                    "InvalidVolumeModification.NotFound", f"Modification for volume '{volume_id}' does not exist."
                )
        return describe(self, volume_ids, filters)

    backend.modify_volume = modify_volume
    backend.describe_volumes_modifications = describe_volumes_modifications
