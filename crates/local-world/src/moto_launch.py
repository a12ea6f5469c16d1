# Starts moto_server after closing five gaps between moto's EC2 model and
# EC2 itself that the publisher depends on. Product code never sees this
# file: it only changes what the emulator answers, towards what AWS answers.
#
# 1. RegisterImage: moto ignores the block device mappings (and tags) and
#    invents a 15 GiB snapshot; EC2 registers the snapshot it is given. Here
#    the AMI's mappings are the ones registered, the root snapshot is marked
#    in use by the AMI (so it cannot be deleted before the AMI is
#    deregistered, as in EC2) and the tag specification is applied. A name
#    the account already uses in the region is refused
#    (InvalidAMIName.Duplicate), as EC2 does; moto accepted it.
# 2. CopyImage of such an AMI copies its snapshots (encrypted when asked), as
#    EC2 does, instead of inventing a fresh one.
# 3. CopySnapshot can read a snapshot another account shared with the caller
#    (createVolumePermission), as EC2 allows; moto only looks in the
#    caller's own account. The copy holds its source's bytes.
# 4. CreateSnapshot of a volume the world backs with a file
#    ($LOCAL_WORLD_DIR/volumes/VOL.img) copies that file (sparsely) to
#    $LOCAL_WORLD_DIR/snapshots/SNAP.img before answering: an EBS snapshot
#    holds the volume's bytes of the moment it was started, whatever is
#    written afterwards.
# 5. ModifyVolume: a modification reports its state ("completed" at once, as
#    moto applies it at once), and a volume can be modified once in six
#    hours (VolumeModificationRateExceeded), as in EC2.
#
# Not a change to moto's answers: with LOCAL_WORLD_DIR set, every request is
# logged to $LOCAL_WORLD_DIR/api-calls.log as "SERVICE ACTION APP" (APP from
# the caller's User-Agent "app/NAME", or "-"), so that tests and benchmarks
# can count the calls a tool makes.
#
# Usage: python moto_launch.py -H HOST -p PORT (moto_server's arguments).

import copy
import os
import subprocess
import sys

from moto.ec2.exceptions import EC2ClientError, InvalidSnapshotIdError
from moto.ec2.models import amis as moto_amis
from moto.ec2.models import elastic_block_store as moto_ebs
from moto.ec2.responses import amis as amis_responses
from moto.ec2.utils import random_snapshot_id

_WORLD = os.environ.get("LOCAL_WORLD_DIR")
Ami = moto_amis.Ami
EBSBackend = moto_ebs.EBSBackend
Snapshot = moto_ebs.Snapshot

_default_mappings = Ami.block_device_mappings.fget


def _mappings(self):
    registered = getattr(self, "registered_mappings", None)
    return registered if registered is not None else _default_mappings(self)


Ami.block_device_mappings = property(_mappings)


def _adopt_snapshots(backend, ami, mappings):
    """Make `mappings` the AMI's own, dropping the snapshot moto invented."""
    invented = ami.ebs_snapshot
    root = None
    for m in mappings:
        sid = (m.get("Ebs") or {}).get("SnapshotId")
        if not sid:
            continue
        snap = backend.get_snapshot(sid)  # InvalidSnapshot.NotFound if absent
        snap.from_ami = ami.id
        m["Ebs"].setdefault("VolumeSize", snap.volume.size)
        m["Ebs"]["Encrypted"] = bool(snap.encrypted)
        if m.get("DeviceName") == ami.root_device_name or root is None:
            root = snap
    ami.registered_mappings = mappings
    if root is not None:
        ami.ebs_snapshot = root
        ami.root_device_type = "ebs"
    backend.snapshots.pop(invented.id, None)


def _clean_mapping(m):
    out = {"DeviceName": m.get("DeviceName")}
    if m.get("VirtualName"):
        out["VirtualName"] = m["VirtualName"]
    ebs = m.get("Ebs")
    if ebs:
        e = {"DeleteOnTermination": str(ebs.get("DeleteOnTermination", True)).lower() == "true"}
        for key in ("SnapshotId", "VolumeType", "Iops", "Throughput", "KmsKeyId"):
            if ebs.get(key) is not None:
                e[key] = ebs[key]
        if ebs.get("VolumeSize") is not None:
            e["VolumeSize"] = int(ebs["VolumeSize"])
        out["Ebs"] = e
    return out


_register_response = amis_responses.AmisResponse.register_image


def _refuse_taken_name(backend, name):
    for ami in backend.amis.values():
        if name and ami.name == name and ami.owner_id == backend.account_id:
            raise EC2ClientError("InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {ami.id}")


def register_image(self):
    _refuse_taken_name(self.ec2_backend, self._get_param("Name"))
    raw = self._get_param("BlockDeviceMappings") or self._get_param("BlockDeviceMapping") or []
    if isinstance(raw, dict):
        raw = list(raw.values())
    # A missing snapshot is refused before anything is registered.
    for m in raw:
        sid = (m.get("Ebs") or {}).get("SnapshotId")
        if sid:
            self.ec2_backend.get_snapshot(sid)
    result = _register_response(self)
    ami = self.ec2_backend.amis[result.result["ImageId"]]
    for attr, param in (
        ("root_device_name", "RootDeviceName"),
        ("architecture", "Architecture"),
        ("virtualization_type", "VirtualizationType"),
        ("boot_mode", "BootMode"),
    ):
        value = self._get_param(param)
        if value:
            setattr(ami, attr, value)
    if raw:
        _adopt_snapshots(self.ec2_backend, ami, [_clean_mapping(m) for m in raw])
    tags = self._parse_tag_specification().get("image", {})
    if tags:
        ami.add_tags(tags)
    return result


amis_responses.AmisResponse.register_image = register_image

def _shared_snapshot(backend, snapshot_id, source_region):
    """The snapshot `snapshot_id` in `source_region` as the caller may read
    it: its own, or another account's that is shared with it."""
    from moto.ec2.models import ec2_backends

    own = ec2_backends[backend.account_id][source_region]
    if snapshot_id in own.snapshots:
        return own.snapshots[snapshot_id]
    for account in list(ec2_backends.keys()):
        if account == backend.account_id:
            continue
        regions = ec2_backends[account]
        if source_region not in regions.keys():
            continue
        snap = regions[source_region].snapshots.get(snapshot_id)
        if snap is None:
            continue
        if backend.account_id in snap.create_volume_permission_userids or "all" in (
            snap.create_volume_permission_groups
        ):
            return snap
    raise InvalidSnapshotIdError()


def _keep_bytes(source, snapshot_id):
    """Copy the world's file `source` (relative to $LOCAL_WORLD_DIR) to
    snapshots/SNAPSHOT_ID.img, sparsely and atomically, if both exist."""
    if not _WORLD or not os.path.exists(os.path.join(_WORLD, source)):
        return
    dest = os.path.join(_WORLD, "snapshots", f"{snapshot_id}.img")
    subprocess.run(["cp", "--sparse=always", os.path.join(_WORLD, source), dest + ".part"], check=True)
    os.rename(dest + ".part", dest)


def copy_snapshot(self, source_snapshot_id, source_region, description, kms_key_id, *args, **kwargs):
    source = _shared_snapshot(self, source_snapshot_id, source_region)
    snapshot_id = random_snapshot_id()
    snapshot = Snapshot(
        self,
        snapshot_id,
        volume=source.volume,
        description=description,
        encrypted=source.encrypted,
        kms_key_id=kms_key_id,
    )
    self.snapshots[snapshot_id] = snapshot
    # The copy holds the source snapshot's bytes (not its volume's now).
    _keep_bytes(os.path.join("snapshots", f"{source_snapshot_id}.img"), snapshot_id)
    return snapshot


EBSBackend.copy_snapshot = copy_snapshot

_create_snapshot = EBSBackend.create_snapshot


def create_snapshot(self, volume_id, *args, **kwargs):
    snapshot = _create_snapshot(self, volume_id, *args, **kwargs)
    _keep_bytes(os.path.join("volumes", f"{volume_id}.img"), snapshot.id)
    return snapshot


EBSBackend.create_snapshot = create_snapshot

_copy_image_response = amis_responses.AmisResponse.copy_image


def copy_image(self):
    from moto.ec2.models import ec2_backends

    _refuse_taken_name(self.ec2_backend, self._get_param("Name"))
    result = _copy_image_response(self)
    source_region = self._get_param("SourceRegion")
    source = ec2_backends[self.ec2_backend.account_id][source_region].amis.get(self._get_param("SourceImageId"))
    ami = self.ec2_backend.amis[result.result["ImageId"]]
    tags = self._parse_tag_specification().get("image", {})
    if tags:
        ami.add_tags(tags)
    registered = getattr(source, "registered_mappings", None)
    if registered is None:
        return result
    encrypted = str(self._get_param("Encrypted", "false")).lower() == "true"
    kms_key_id = self._get_param("KmsKeyId")
    mappings = copy.deepcopy(registered)
    for m in mappings:
        ebs = m.get("Ebs") or {}
        if not ebs.get("SnapshotId"):
            continue
        snap = self.ec2_backend.copy_snapshot(
            ebs["SnapshotId"], source_region, f"Copied for {ami.id} from {source.id}", kms_key_id
        )
        snap.encrypted = snap.encrypted or encrypted
        ebs["SnapshotId"] = snap.id
    ami.root_device_name = source.root_device_name
    ami.boot_mode = source.boot_mode
    _adopt_snapshots(self.ec2_backend, ami, mappings)
    return result


amis_responses.AmisResponse.copy_image = copy_image

moto_ebs.VolumeModification.modification_state = "completed"
moto_ebs.VolumeModification.progress = 100
_modify_volume = EBSBackend.modify_volume


def modify_volume(self, volume_id, *args, **kwargs):
    volume = self.get_volume(volume_id)
    if volume.modifications:
        raise EC2ClientError(
            "VolumeModificationRateExceeded",
            f"You've reached the maximum modification rate per volume limit. "
            f"Wait at least 6 hours between modifications per EBS volume ({volume_id}).",
        )
    return _modify_volume(self, volume_id, *args, **kwargs)


EBSBackend.modify_volume = modify_volume

from moto.core.responses import BaseResponse

_call_action = BaseResponse.call_action
# Line-buffered: each call's line is in the file when the call is answered.
_CALLS = open(os.path.join(_WORLD, "api-calls.log"), "a", encoding="utf-8", buffering=1) if _WORLD else None


def call_action(self):
    if _CALLS:
        agent = self.headers.get("User-Agent", "")
        app = next((p[len("app/") :] for p in agent.split() if p.startswith("app/")), "-")
        _CALLS.write(f"{self.service_name} {self._get_action()} {app}\n")
    return _call_action(self)


BaseResponse.call_action = call_action

if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
