# KMS keys as EBS uses them. moto (5.1.22) lacks or differs on:
#
# - GetEbsDefaultKmsKeyId: not implemented. EC2 answers the account's
#   default EBS key in the region: "alias/aws/ebs" until
#   ModifyEbsDefaultKmsKeyId sets another (EC2 API reference, and the AWS
#   CLI's get-ebs-default-kms-key-id example).
# - The AWS managed key behind alias/aws/ebs (and every alias/aws/*): KMS
#   describes it with KeyManager "AWS" (KMS API reference, KeyMetadata);
#   moto says "CUSTOMER" for every key.
# - CreateVolume's KmsKeyId may be a key id, key ARN, alias name or alias
#   ARN; the volume then shows the key's ARN (DescribeVolumes, KmsKeyId:
#   "the Amazon Resource Name (ARN) of the KMS key"). moto keeps the
#   string as given.
# - CreateSnapshot of an encrypted volume: "snapshots that are created from
#   encrypted volumes are automatically encrypted" with the volume's key
#   ("Amazon EBS encryption"); moto's snapshot has no key.
# - ModifySnapshotAttribute: "Snapshots encrypted with your default KMS key
#   cannot be shared with other accounts" (EC2 API reference). EC2 names
#   no error code for it; the world answers InvalidParameter, refusing
#   before anything changes.

from moto.ec2.exceptions import EC2ClientError

DEFAULT_ALIAS = "alias/aws/ebs"


def _kms(account_id, region):
    from moto.kms import kms_backends

    return kms_backends[account_id][region]


def _is_aws_managed(key):
    return any(a.startswith("alias/aws/") for a in key.aliases)


def key_of(account_id, region, key_id):
    """The KMS key `key_id` names (id, ARN, alias or alias ARN), or None."""
    if not key_id:
        return None
    try:
        return _kms(account_id, region).describe_key(key_id)
    except Exception:
        return None


def aws_managed(account_id, region, key_id):
    key = key_of(account_id, region, key_id)
    return key is not None and _is_aws_managed(key)


def install():
    from moto.core.responses import ActionResult
    from moto.ec2.models import elastic_block_store as moto_ebs
    from moto.ec2.responses import elastic_block_store as ebs_responses
    from moto.kms import models as kms_models

    # KeyManager AWS for the keys behind alias/aws/*.
    original_alias = kms_models.KmsBackend.create_alias

    def create_alias(self, target_key_id, alias_name):
        alias = original_alias(self, target_key_id, alias_name)
        if alias_name.startswith("alias/aws/"):
            self.keys[self.get_key_id(target_key_id)].key_manager = "AWS"
        return alias

    kms_models.KmsBackend.create_alias = create_alias

    # GetEbsDefaultKmsKeyId.
    def get_ebs_default_kms_key_id(self):
        backend = self.ec2_backend
        modified = getattr(backend, "default_kms_key_modified", False)
        return ActionResult({"KmsKeyId": backend.default_kms_key_id if modified else DEFAULT_ALIAS})

    ebs_responses.ElasticBlockStore.get_ebs_default_kms_key_id = get_ebs_default_kms_key_id
    original_modify_default = moto_ebs.EBSBackend.modify_ebs_default_kms_key_id

    def modify_ebs_default_kms_key_id(self, kms_key_id):
        arn = original_modify_default(self, kms_key_id)
        self.default_kms_key_modified = bool(kms_key_id)
        return arn

    moto_ebs.EBSBackend.modify_ebs_default_kms_key_id = modify_ebs_default_kms_key_id

    # Volumes show their key's ARN; snapshots carry their volume's key.
    original_create_volume = moto_ebs.EBSBackend.create_volume

    def create_volume(self, *args, **kwargs):
        volume = original_create_volume(self, *args, **kwargs)
        key = key_of(self.account_id, self.region_name, volume.kms_key_id)
        if key is not None:
            volume.kms_key_id = key.arn
        return volume

    moto_ebs.EBSBackend.create_volume = create_volume
    original_create_snapshot = moto_ebs.EBSBackend.create_snapshot

    def create_snapshot(self, volume_id, *args, **kwargs):
        snapshot = original_create_snapshot(self, volume_id, *args, **kwargs)
        if snapshot.encrypted and not snapshot.kms_key_id:
            snapshot.kms_key_id = self.get_volume(volume_id).kms_key_id
        return snapshot

    moto_ebs.EBSBackend.create_snapshot = create_snapshot

    # No sharing of a snapshot under the AWS managed key.
    original_add = moto_ebs.EBSBackend.add_create_volume_permission

    def add_create_volume_permission(self, snapshot_id, user_ids, groups):
        snapshot = self.get_snapshot(snapshot_id)
        if user_ids and snapshot.encrypted and aws_managed(self.account_id, self.region_name, snapshot.kms_key_id):
            raise EC2ClientError(
                "InvalidParameter",
                f"Snapshot {snapshot_id} is encrypted with the AWS managed key {DEFAULT_ALIAS}, and snapshots "
                "encrypted with the default KMS key cannot be shared with other accounts.",
            )
        return original_add(self, snapshot_id, user_ids=user_ids, groups=groups)

    moto_ebs.EBSBackend.add_create_volume_permission = add_create_volume_permission
