# Starts moto_server after closing gaps between moto's EC2 model and EC2
# itself that the publisher depends on, and after applying the world's model
# of EC2's pace and faults (world_model.py). Product code never sees this
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
#    EC2 does, instead of inventing a fresh one, and applies the request's
#    tag specifications: "image" to the new AMI, "snapshot" to every new
#    snapshot (CopyImage's TagSpecifications in the EC2 API reference); moto
#    applied neither.
# 3. CopySnapshot can read a snapshot another account shared with the caller
#    (createVolumePermission), as EC2 allows; moto only looks in the
#    caller's own account. The copy holds its source's bytes.
# 4. CreateSnapshot of a volume the world backs with a file
#    ($LOCAL_WORLD_DIR/volumes/VOL.img) copies that file (sparsely) to
#    $LOCAL_WORLD_DIR/snapshots/SNAP.img before answering: an EBS snapshot
#    holds the volume's bytes of the moment it was started, whatever is
#    written afterwards.
# 5. ModifyVolume and DescribeVolumesModifications as EC2 answers them
#    (world/volume_modifications.py), and CreateSnapshot's per-volume limits
#    (world/snapshot_limits.py), snapshots and AMIs that end failed
#    (world/failed_states.py, fault fail=P), tag changes seen late
#    (world/tag_lag.py, fault lag=D). Each behaviour added since is a module of
#    its own under world/, with its EC2 source in its header.
#
# 6. Pace (LOCAL_WORLD_PACE=aws, the default): every call takes a latency,
#    and volumes are `creating`, attachments `attaching` and `detaching`,
#    snapshots `pending` (for a time growing with the blocks changed since
#    the volume's previous snapshot), AMIs `pending` until their snapshots
#    complete, instances `pending`, `stopping` and `shutting-down`, for
#    world_model.py's durations. A volume that is not `available` cannot be
#    attached (IncorrectState, VolumeInUse), one that is `in-use` (also
#    while detaching) cannot be deleted, and an instance between states can
#    be neither started nor stopped (IncorrectInstanceState), as in EC2.
# 7. ClientToken: CreateVolume, RunInstances and CopyImage given a token
#    they already answered (same account and region) answer as they did,
#    making nothing; with other parameters they answer
#    IdempotentParameterMismatch. moto ignores the token.
# 8. Faults (LOCAL_WORLD_FAULTS): request token buckets per account, region
#    and action (RequestLimitExceeded), random throttling, 500/503 errors,
#    eventual consistency (a new resource is NotFound to calls naming it,
#    and missing from lists, for a while), answers of mutating calls lost
#    before or after EC2 acted, and answers withheld (no answer ever comes)
#    before or after EC2 acted. Each call's outcome is logged (see below).
#
# The world's own calls (User-Agent app/local-world: setting the world up,
# the attacher) are served as moto serves them: no latency, no faults, no
# buckets, and what they create is neither pending nor lagging. A bad world
# variable stops the launcher before it serves anything, with a line
# "local-world: VARIABLE: what is wrong" on stderr and exit status 2.
#
# Not a change to moto's answers: with LOCAL_WORLD_DIR set, every request is
# logged to $LOCAL_WORLD_DIR/api-calls.log as "SERVICE ACTION APP OUTCOME"
# (APP from the caller's User-Agent "app/NAME", or "-"; OUTCOME "ok", or the
# fault that answered: "bucket", "throttle", "error", "lag", "lost", "hang";
# or, for an error EC2 itself would give, its code), so that
# tests and benchmarks can count the calls a tool makes.
#
# Usage: python moto_launch.py -H HOST -p PORT (moto_server's arguments).

import os
import sys

import world_model

# Checked before moto is imported, so a bad value is reported at once.
try:
    CONFIG = world_model.config_from_env(os.environ)
except world_model.Refused as refused:
    print(f"local-world: {refused}", file=sys.stderr, flush=True)
    sys.exit(2)

# 10. IAM (world/iam_policy.py): with LOCAL_WORLD_IAM_POLICY naming a
#     policy file, every EC2 call ami-publisher makes is evaluated against
#     it and refused with UnauthorizedOperation when it does not allow it.
from world import iam_policy

try:
    IAM_POLICY = iam_policy.load(os.environ["LOCAL_WORLD_IAM_POLICY"]) if os.environ.get("LOCAL_WORLD_IAM_POLICY") else None
except (OSError, ValueError) as e:
    print(f"local-world: LOCAL_WORLD_IAM_POLICY: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
# The app (User-Agent app/NAME) whose calls the policy governs.
IAM_APP = "ami-publisher"

# 9 (continued). moto registers some 1,200 public AMIs per region (ECS
# images mostly) and DescribeImages filters all of them on every call: 130 ms
# of this one process per call, while EC2 answers an owner's DescribeImages
# in tens of milliseconds whatever the public catalogue holds. The world
# offers one public base image per region (what the unpacker instances boot
# from) instead. Set before moto is imported: moto reads it at import.
if "MOTO_AMIS_PATH" not in os.environ:
    import json as _json

    _base = os.path.join(os.environ.get("LOCAL_WORLD_DIR") or os.getcwd(), "base-amis.json")
    with open(_base, "w", encoding="utf-8") as _f:
        _json.dump(
            [
                {
                    "ami_id": "ami-1e749f67",
                    "state": "available",
                    "public": True,
                    "owner_id": "099720109477",
                    "image_location": "amazon/getting-started",
                    "sriov": "simple",
                    "root_device_type": "ebs",
                    "root_device_name": "/dev/sda1",
                    "description": "A public Linux base image (the world's unpacker instances boot from it)",
                    "image_type": "machine",
                    "platform": None,
                    "architecture": "x86_64",
                    "name": "local-world/base-linux-x86_64",
                    "virtualization_type": "hvm",
                    "hypervisor": "xen",
                }
            ],
            _f,
        )
    os.environ["MOTO_AMIS_PATH"] = _base

import copy
import socket
import subprocess
import tempfile
import threading
import time

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

# 11. What RegisterImage is given is kept and described (world/image_attributes.py).
from moto.ec2.models.amis import AmiBackend as _AmiBackend
from world import image_attributes, shared_images

image_attributes.install(_AmiBackend)
# 12. AMIs shared with other accounts can be seen, launched and copied by
#     them (world/shared_images.py).
shared_images.install()
# 13. KMS keys as EBS uses them: GetEbsDefaultKmsKeyId, AWS managed keys,
#     the key of volumes and snapshots, no sharing under aws/ebs
#     (world/kms_keys.py).
from world import kms_keys

kms_keys.install()
# 14. The world's organization gets accounts of the ids it names
#     (world/organization.py).
from world import organization

organization.install()
# 15. Allowed AMIs: which other accounts' AMIs an account sees and launches
#     (world/allowed_images.py).
from world import allowed_images

allowed_images.install()
# 16. Parameters of data type aws:ec2:image are validated after PutParameter
#     answers (world/ssm_images.py).
from world import ssm_images

ssm_images.install(lambda: _pending_until("ssm-image", world_model.SSM_IMAGE_VALIDATION))
# 17. An AMI's life: deprecation, deregistration protection, disabling, its
#     last launch and what references it (world/image_lifecycle.py).
from world import image_lifecycle

image_lifecycle.install()

# 18. S3's conditional writes are atomic, as on S3 (world/s3_conditional.py):
#     imageservers sharing a bucket commit a leaf once.
from world import s3_conditional

s3_conditional.install()

# 19. The EBS direct APIs with EBS's 512 KiB blocks, parent snapshots,
#     checksums, client tokens, timeouts and quotas, their snapshots EC2
#     snapshots whose bytes the world keeps; a tool's EBS calls at the
#     world's pace and under its faults, and a new snapshot unknown to
#     writes for a while (world/ebs_direct.py).
from world import ebs_direct


def _ebs_pending(snapshot):
    snapshot.started = time.monotonic()
    snapshot.ready_at = FOREVER


def _ebs_complete(snapshot, written_bytes):
    snapshot.started = time.monotonic()
    snapshot.ready_at = snapshot.started + MODEL.snapshot_seconds(written_bytes) if CONFIG.paced else None


def _ebs_fail(snapshot):
    snapshot.ready_at = None
    snapshot.status = "error"


ebs_direct.install(
    _WORLD or tempfile.mkdtemp(prefix="local-world-ebs-"),
    lambda: CONFIG.scale,
    _ebs_pending,
    _ebs_complete,
    _ebs_fail,
)


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
    image_attributes.keep(ami, self._get_param)
    tags = self._parse_tag_specification().get("image", {})
    if tags:
        ami.add_tags(tags)
    _pace_new_image(ami)
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
    _pace_copied_snapshot(snapshot, source_snapshot_id)
    return snapshot


EBSBackend.copy_snapshot = copy_snapshot

_create_snapshot = EBSBackend.create_snapshot


def create_snapshot(self, volume_id, *args, **kwargs):
    snapshot = _create_snapshot(self, volume_id, *args, **kwargs)
    _keep_bytes(os.path.join("volumes", f"{volume_id}.img"), snapshot.id)
    _pace_new_snapshot(snapshot, volume_id)
    return snapshot


EBSBackend.create_snapshot = create_snapshot

_copy_image_response = amis_responses.AmisResponse.copy_image


def copy_image(self):
    _refuse_taken_name(self.ec2_backend, self._get_param("Name"))
    source_region = self._get_param("SourceRegion")
    # Its own AMI, or one another account shared with it; of another
    # account's, every snapshot must be readable by the caller too
    # (createVolumePermission), checked before anything is made.
    source = shared_images.find(self.ec2_backend, self._get_param("SourceImageId"), source_region)
    if source.owner_id != self.ec2_backend.account_id:
        for m in getattr(source, "registered_mappings", None) or []:
            sid = (m.get("Ebs") or {}).get("SnapshotId")
            if sid:
                _shared_snapshot(self.ec2_backend, sid, source_region)
    result = _copy_image_response(self)
    ami = self.ec2_backend.amis[result.result["ImageId"]]
    image_attributes.copy(source, ami)
    tag_specs = self._parse_tag_specification()
    tags = tag_specs.get("image", {})
    if tags:
        ami.add_tags(tags)
    _pace_new_image(ami)
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
        if tag_specs.get("snapshot"):
            snap.add_tags(tag_specs["snapshot"])
        ebs["SnapshotId"] = snap.id
    ami.root_device_name = source.root_device_name
    ami.boot_mode = source.boot_mode
    _adopt_snapshots(self.ec2_backend, ami, mappings)
    return result


amis_responses.AmisResponse.copy_image = copy_image

from world import failed_states, snapshot_limits, tag_lag, volume_modifications

volume_modifications.install()
# Outermost, so that a refused snapshot is refused before anything is made.
snapshot_limits.install(lambda: _modelled())

# --- 6-8: pace, client tokens, faults --------------------------------------

from flask import request as _flask_request
from moto.core.responses import BaseResponse
from moto.ec2.models import instances as moto_instances

MODEL = world_model.Model(CONFIG)
tag_lag.install(lambda: _modelled(), lambda action: _serving(action), MODEL, lambda: _CALL.key)
Instance = moto_instances.Instance
InstanceBackend = moto_instances.InstanceBackend
InstanceState = moto_instances.InstanceState
Volume = moto_ebs.Volume
VolumeAttachment = moto_ebs.VolumeAttachment
FOREVER = float("inf")

# moto's state is not made for concurrent requests: every request is served
# under this lock, but its latency is slept outside it, so calls overlap as
# they do in EC2.
LOCK = threading.RLock()
# The call being served (under LOCK): whether it is modelled (not the
# world's own), its key for random draws, ids it created, and work to do
# once the lock is released.
_CALL = threading.local()
# The session name of the world's own AssumeRole calls (lib.rs WORLD_SESSION).
WORLD_SESSION = "local-world"
# Resource id -> monotonic time until which it is unknown (lag).
_UNSEEN = {}
# Volume id -> its newest snapshot, the base of the next one's increment.
_LAST_SNAPSHOT = {}
# (account, region, action, token) -> (parameters, status, headers, body).
_TOKENS = {}


def _modelled():
    return getattr(_CALL, "modelled", False)


def _serving(action):
    """Whether the call being served is `action` itself (not another action
    that moto implements through the same backend method, as RunInstances
    makes and attaches its root volume)."""
    return getattr(_CALL, "action", None) == action


def _pending_until(what, low_high):
    """When a resource the current call makes leaves its pending state."""
    if not _modelled():
        return None
    seconds = MODEL.pending(what, _CALL.key, low_high)
    return time.monotonic() + seconds if seconds > 0 else None


def _before(until):
    return until is not None and time.monotonic() < until


def _created(resource_id, resource=None, kind=None):
    """A resource the call being served made: lag applies to its id, and a
    snapshot or AMI (`resource` of `kind`) may be decided to fail."""
    if _modelled():
        _CALL.created.append(resource_id)
        if resource is not None:
            failed_states.mark(resource, kind, MODEL, _CALL.key)


# Volumes: creating -> available; attachments: attaching -> attached,
# detaching -> detached.
_volume_status = Volume.status.fget


def _shown_attachment(self):
    if self.attachment is not None:
        return self.attachment
    leaving = self.__dict__.get("leaving")
    return leaving if leaving is not None and _before(leaving.__dict__.get("until")) else None


def _volume_status_now(self):
    if _before(self.__dict__.get("ready_at")):
        return "creating"
    if _shown_attachment(self) is not None:
        return "in-use"
    return _volume_status(self)


Volume.status = property(_volume_status_now)
Volume.shown_attachment = property(_shown_attachment)
_volume_filter = Volume.get_filter_value


def _volume_filter_value(self, filter_name, method_name=None):
    if filter_name.startswith("attachment.") and self.attachment is None and _shown_attachment(self) is not None:
        # Still detaching: filters see the attachment as DescribeVolumes does.
        shown = _shown_attachment(self)
        return {
            "attachment.attach-time": shown.attach_time,
            "attachment.device": shown.device,
            "attachment.instance-id": shown.instance.id,
            "attachment.status": shown.status,
        }.get(filter_name)
    return _volume_filter(self, filter_name, method_name)


Volume.get_filter_value = _volume_filter_value


def _attachment_status(self):
    status = self.__dict__.get("_status")
    if status == "attached" and _before(self.__dict__.get("ready_at")):
        return "attaching"
    if status == "detached" and _before(self.__dict__.get("until")):
        return "detaching"
    return status


def _set_attachment_status(self, value):
    self.__dict__["_status"] = value


VolumeAttachment.status = property(_attachment_status, _set_attachment_status)

from moto.ec2.responses import elastic_block_store as ebs_responses

# moto's DescribeVolumes shows every attachment as "attached".
ebs_responses.DESCRIBE_VOLUMES_RESPONSE = (
    ebs_responses.DESCRIBE_VOLUMES_RESPONSE.replace("volume.attachment", "volume.shown_attachment").replace(
        "<status>attached</status>", "<status>{{ volume.shown_attachment.status }}</status>"
    )
)
# moto's DescribeSnapshots shows every snapshot 100% done.
ebs_responses.DESCRIBE_SNAPSHOTS_RESPONSE = ebs_responses.DESCRIBE_SNAPSHOTS_RESPONSE.replace(
    "<progress>100%</progress>", "<progress>{{ snapshot.progress }}</progress>"
)

_create_volume = EBSBackend.create_volume


def create_volume(self, *args, **kwargs):
    volume = _create_volume(self, *args, **kwargs)
    if _serving("CreateVolume"):
        volume.ready_at = _pending_until("volume", world_model.VOLUME_CREATING)
        _created(volume.id)
    return volume


EBSBackend.create_volume = create_volume
_attach_volume = EBSBackend.attach_volume


def attach_volume(self, volume_id, instance_id, *args, **kwargs):
    if not _serving("AttachVolume"):
        return _attach_volume(self, volume_id, instance_id, *args, **kwargs)
    volume = self.get_volume(volume_id)
    if volume.status == "in-use":
        raise EC2ClientError("VolumeInUse", f"{volume_id} is already attached to an instance")
    if volume.status != "available":
        raise EC2ClientError("IncorrectState", f"{volume_id} is not 'available'.")
    attachment = _attach_volume(self, volume_id, instance_id, *args, **kwargs)
    if attachment is not None:
        attachment.ready_at = _pending_until("attach", world_model.ATTACHING)
        volume.leaving = None
    return attachment


EBSBackend.attach_volume = attach_volume
_detach_volume = EBSBackend.detach_volume


def detach_volume(self, volume_id, *args, **kwargs):
    attachment = _detach_volume(self, volume_id, *args, **kwargs)
    if _serving("DetachVolume"):
        attachment.until = _pending_until("detach", world_model.DETACHING)
        self.get_volume(volume_id).leaving = attachment
    return attachment


EBSBackend.detach_volume = detach_volume
_delete_volume = EBSBackend.delete_volume


def delete_volume(self, volume_id):
    volume = self.volumes.get(volume_id)
    shown = _shown_attachment(volume) if volume is not None else None
    if shown is not None:
        raise EC2ClientError("VolumeInUse", f"Volume {volume_id} is currently attached to {shown.instance.id}")
    return _delete_volume(self, volume_id)


EBSBackend.delete_volume = delete_volume


# Snapshots: pending -> completed.
def _snapshot_status(self):
    if _before(self.__dict__.get("ready_at")):
        return "pending"
    return self.__dict__.get("_status", "completed")


def _set_snapshot_status(self, value):
    self.__dict__["_status"] = value


def _snapshot_progress(self):
    if _snapshot_status(self) != "pending":
        return "100%"
    started, ready = self.__dict__.get("started", 0.0), self.__dict__.get("ready_at")
    if ready is None or ready == FOREVER or ready <= started:
        return "0%"
    return f"{min(99, int(100 * (time.monotonic() - started) / (ready - started)))}%"


Snapshot.status = property(_snapshot_status, _set_snapshot_status)
Snapshot.progress = property(_snapshot_progress)


def _snapshot_file(snapshot_id):
    return os.path.join(_WORLD, "snapshots", f"{snapshot_id}.img") if _WORLD and snapshot_id else None


def _pace_new_snapshot(snapshot, volume_id):
    """CreateSnapshot: pending while the blocks changed since the volume's
    previous snapshot are copied. They are counted in the background once
    the call is answered; until then the snapshot is pending."""
    volume = snapshot.volume
    base = _LAST_SNAPSHOT.get(volume_id) or getattr(volume, "snapshot_id", None)
    _LAST_SNAPSHOT[volume_id] = snapshot.id
    _created(snapshot.id, snapshot, "snapshot")
    if not (_modelled() and CONFIG.paced):
        return
    snapshot.started = time.monotonic()
    snapshot.ready_at = FOREVER
    new, old = _snapshot_file(snapshot.id), _snapshot_file(base)

    def settle():
        changed = world_model.changed_bytes(new, old)
        with LOCK:
            snapshot.changed_bytes = changed
            snapshot.ready_at = snapshot.started + MODEL.snapshot_seconds(changed)

    _CALL.after.append(settle)


def _pace_copied_snapshot(snapshot, source_snapshot_id):
    """CopySnapshot (and CopyImage's copies): pending while the source's
    data is copied."""
    _created(snapshot.id, snapshot, "snapshot")
    if _modelled() and CONFIG.paced:
        snapshot.started = time.monotonic()
        data = world_model.data_bytes(_snapshot_file(source_snapshot_id))
        snapshot.ready_at = snapshot.started + MODEL.copy_seconds(data)


# AMIs: pending until registered and their snapshots complete.
def _ami_state(self):
    state = self.__dict__.get("_state", "available")
    if state != "available" or "ready_at" not in self.__dict__:
        return state
    if _before(self.__dict__["ready_at"]):
        return "pending"
    for m in getattr(self, "registered_mappings", None) or []:
        snap = self.ec2_backend.snapshots.get((m.get("Ebs") or {}).get("SnapshotId"))
        if snap is not None and snap.status == "pending":
            return "pending"
    return state


def _set_ami_state(self, value):
    self.__dict__["_state"] = value


Ami.state = property(_ami_state, _set_ami_state)
failed_states.install(Snapshot, Ami)


def _pace_new_image(ami):
    _created(ami.id, ami, "image")
    if _modelled() and CONFIG.paced:
        ami.ready_at = _pending_until("image", world_model.AMI_REGISTERING)


# Instances: pending -> running, stopping -> stopped, shutting-down ->
# terminated. `_state` is what moto reads and writes; between states it
# shows the transition instead.
def _instance_state(self):
    moving = self.__dict__.get("moving")
    if moving is not None and _before(moving[0]):
        return InstanceState(moving[1], moving[2])
    return self.__dict__.get("_real_state")


def _set_instance_state(self, value):
    self.__dict__["_real_state"] = value


Instance._state = property(_instance_state, _set_instance_state)


def _moving(instance):
    moving = instance.__dict__.get("moving")
    return moving is not None and _before(moving[0])


def _move(instance, what, low_high, name, code):
    until = _pending_until(what, low_high)
    instance.moving = (until, name, code) if until is not None else None


_run_instances = InstanceBackend.run_instances


def run_instances(self, *args, **kwargs):
    reservation = _run_instances(self, *args, **kwargs)
    for instance in reservation.instances:
        _move(instance, "run", world_model.INSTANCE_PENDING, "pending", 0)
        _created(instance.id)
    return reservation


InstanceBackend.run_instances = run_instances


def _refuse_moving(instance, verb):
    if _moving(instance):
        raise EC2ClientError(
            "IncorrectInstanceState",
            f"The instance '{instance.id}' is not in a state from which it can be {verb}.",
        )


_start = Instance.start
_stop = Instance.stop
_terminate = Instance.terminate


def start(self, *args, **kwargs):
    _refuse_moving(self, "started")
    previous = _start(self, *args, **kwargs)
    _move(self, "start", world_model.INSTANCE_PENDING, "pending", 0)
    return previous


def stop(self, *args, **kwargs):
    _refuse_moving(self, "stopped")
    previous = _stop(self, *args, **kwargs)
    _move(self, "stop", world_model.INSTANCE_STOPPING, "stopping", 64)
    return previous


def terminate(self, *args, **kwargs):
    self.moving = None
    previous = _terminate(self, *args, **kwargs)
    _move(self, "terminate", world_model.INSTANCE_SHUTTING_DOWN, "shutting-down", 32)
    return previous


Instance.start = start
Instance.stop = stop
Instance.terminate = terminate


# Lag: a new resource is unknown to calls naming it, and left out of lists.
def _seen(resource_id):
    until = _UNSEEN.get(resource_id)
    if until is None:
        return True
    if time.monotonic() >= until:
        del _UNSEEN[resource_id]
        return True
    return False


def _hidden(resource_id):
    return _modelled() and not _seen(resource_id)


_describe_volumes = EBSBackend.describe_volumes
_describe_snapshots = EBSBackend.describe_snapshots
_describe_images = moto_amis.AmiBackend.describe_images
_describe_instances = InstanceBackend.describe_instances


def describe_volumes(self, *args, **kwargs):
    return [v for v in _describe_volumes(self, *args, **kwargs) if not _hidden(v.id)]


def describe_snapshots(self, *args, **kwargs):
    return [s for s in _describe_snapshots(self, *args, **kwargs) if not _hidden(s.id)]


def describe_images(self, *args, **kwargs):
    return [i for i in _describe_images(self, *args, **kwargs) if not _hidden(i.id)]


def describe_instances(self, *args, **kwargs):
    out = []
    for reservation in _describe_instances(self, *args, **kwargs):
        reservation.instances = [i for i in reservation.instances if not _hidden(i.id)]
        if reservation.instances:
            out.append(reservation)
    return out


EBSBackend.describe_volumes = describe_volumes
EBSBackend.describe_snapshots = describe_snapshots
moto_amis.AmiBackend.describe_images = describe_images
InstanceBackend.describe_instances = describe_instances

_NOT_FOUND = {
    "vol-": ("InvalidVolume.NotFound", "The volume '{}' does not exist."),
    "snap-": ("InvalidSnapshot.NotFound", "The snapshot '{}' does not exist."),
    "ami-": ("InvalidAMIID.NotFound", "The image id '[{}]' does not exist"),
    "i-": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
}


def _unseen_named(querystring):
    """The first resource the request names that is still unknown (filters
    do not name: a filter on an unknown id matches nothing)."""
    for name, values in querystring.items():
        if name.startswith("Filter."):
            continue
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value in _UNSEEN and not _seen(value):
                return value
    return None


# Answers the model gives instead of moto's.
def _ec2_error(status, code, message):
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{_xml(message)}</Message></Error></Errors>"
        f"<RequestID>{__import__('uuid').uuid4()}</RequestID></Response>"
    )
    return status, {"Content-Type": "text/xml;charset=UTF-8", "status": str(status)}, body


def _sts_error(status, code, message):
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{_xml(message)}</Message></Error>"
        f"<RequestId>{__import__('uuid').uuid4()}</RequestId></ErrorResponse>"
    )
    return status, {"Content-Type": "text/xml", "status": str(status)}, body


def _xml(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _server_error(key, what):
    if MODEL.draw(what, key) < 0.5:
        return _ec2_error(500, "InternalError", "An internal error has occurred.")
    return _ec2_error(503, "Unavailable", "The server is overloaded and can't handle the request.")


def _can_drop():
    """Whether the caller's connection can be closed unanswered."""
    return _flask_request.environ.get("werkzeug.socket") is not None


def _drop_connection():
    """Close the caller's connection without an answer, as a network
    failure would."""
    sock = _flask_request.environ.get("werkzeug.socket")
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return True


# How long a withheld answer is held back: longer than any caller should
# wait for one, after which the connection is closed unanswered.
WITHHELD_FOR = 600.0


def _withhold(key, answer=None):
    """Keep the caller waiting for an answer that never comes (the
    connection closed after WITHHELD_FOR, or when the caller gives up)."""
    time.sleep(WITHHELD_FOR)
    _drop_connection()
    return answer or _ec2_error(500, "InternalError", "An internal error has occurred.")


_call_action = BaseResponse.call_action
# Line-buffered: each call's line is in the file when the call is answered.
_CALLS = open(os.path.join(_WORLD, "api-calls.log"), "a", encoding="utf-8", buffering=1) if _WORLD else None


_LOG_LOCK = threading.Lock()


def _log(service, action, app, outcome):
    if _CALLS:
        with _LOG_LOCK:
            _CALLS.write(f"{service} {action} {app} {outcome}\n")


def _parameters(querystring):
    """The request's parameters but its token, in a comparable form."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in querystring.items() if k != "ClientToken"))


def call_action(self):
    service, action = self.service_name, self._get_action()
    agent = self.headers.get("User-Agent", "")
    app = next((p[len("app/") :] for p in agent.split() if p.startswith("app/")), "-")
    if service == "sts" and action == "AssumeRole" and self.querystring.get("RoleSessionName") == [WORLD_SESSION]:
        # The world's own AssumeRole (lib.rs names its session so: the SDK's
        # credential provider does not send the app name).
        app = "local-world"
    if service == "ebs" and app != "local-world":
        # 19 (continued): EBS's pace and faults (world/ebs_direct.py).

        def serve():
            with LOCK:
                return _call_action(self)

        return ebs_direct.call(
            self,
            action,
            app,
            MODEL,
            serve,
            lambda outcome: _log(service, action, app, outcome),
            _withhold,
            _can_drop,
            _drop_connection,
            lambda: _ebs_refusal(self, action, app),
        )
    if app == "local-world" or service not in ("ec2", "sts"):
        with LOCK:
            answer = _call_action(self)
            # EBS's REST-JSON errors name their type in a header.
            failed = answer[0] >= 400 and isinstance(answer[1], dict) and answer[1].get("x-amzn-ErrorType")
            _log(service, action, app, failed or "ok")
            return answer
    account, region = self.current_account, self.region
    key = MODEL.next_call(account, region, action)
    time.sleep(MODEL.latency(action, key))
    faulty = service == "ec2"
    params = self.querystring
    unfiltered = set(params) <= {"Action", "Version"}
    if faulty and not MODEL.take_token(account, region, action, unfiltered):
        _log(service, action, app, "bucket")
        return _ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
    if faulty and MODEL.chance("throttle", key):
        _log(service, action, app, "throttle")
        return _ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
    if faulty and MODEL.chance("error", key):
        _log(service, action, app, "error")
        return _server_error(key, "error-kind")
    if service == "sts" and MODEL.chance("throttle", key):
        # STS throttles too, with its own code and error shape.
        _log(service, action, app, "throttle")
        return _sts_error(400, "Throttling", "Rate exceeded")
    if faulty and action in world_model.CAPACITY_CODES and MODEL.chance("capacity", key):
        _log(service, action, app, "capacity")
        code, message = world_model.CAPACITY_CODES[action]
        return _ec2_error(500, code, message)
    mutating = faulty and not world_model.is_read(action)
    withheld = faulty and MODEL.chance("hang", key)
    if withheld and MODEL.draw("hang-kind", key) < 0.5:
        # Withheld before EC2 acted: nothing is done, no answer comes.
        _log(service, action, app, "hang")
        return _withhold(key)
    if mutating and MODEL.chance("lost", key) and MODEL.draw("lost-kind", key) < 1 / 3 and _can_drop():
        # Lost before EC2 acted: the connection fails, nothing is done. The
        # line is logged before the connection goes, so a caller that hears
        # of the failure finds it in the log.
        _log(service, action, app, "lost")
        _drop_connection()
        return _ec2_error(500, "InternalError", "An internal error has occurred.")
    token = params.get("ClientToken") if action in world_model.CLIENT_TOKEN_ACTIONS else None
    token = token[0] if isinstance(token, list) else token
    after = []
    with LOCK:
        unseen = _unseen_named(params) if faulty else None
        if unseen is not None:
            _log(service, action, app, "lag")
            code, message = next(v for p, v in _NOT_FOUND.items() if unseen.startswith(p))
            return _ec2_error(400, code, message.format(unseen))
        refused = _unauthorized(self, service, action, app, params, account, region)
        if refused is not None:
            _log(service, action, app, "UnauthorizedOperation")
            return _ec2_error(403, "UnauthorizedOperation", refused)
        token_key = (account, region, action, token)
        if token and token_key in _TOKENS:
            before, status, headers, body = _TOKENS[token_key]
            if before != _parameters(params):
                _log(service, action, app, "ok")
                return _ec2_error(
                    400,
                    "IdempotentParameterMismatch",
                    "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
                )
            answer = status, dict(headers), body
        else:
            _CALL.modelled, _CALL.action, _CALL.key, _CALL.created, _CALL.after = True, action, key, [], []
            try:
                answer = _call_action(self)
            finally:
                _CALL.modelled, _CALL.action = False, None
            created, after = _CALL.created, _CALL.after
            if answer[0] == 200:
                now = time.monotonic()
                for i, resource_id in enumerate(created):
                    lag = MODEL.lag(f"{key}/{i}")
                    if lag > 0:
                        _UNSEEN[resource_id] = now + lag
                if token:
                    _TOKENS[token_key] = (_parameters(params), answer[0], dict(answer[1]), answer[2])
    for work in after:
        threading.Thread(target=work, daemon=True).start()
    if withheld:
        # Withheld after EC2 acted.
        _log(service, action, app, "hang")
        return _withhold(key, answer)
    if mutating and answer[0] == 200 and MODEL.chance("lost", key):
        # Lost after EC2 acted: a 500, or a connection closed unanswered.
        _log(service, action, app, "lost")
        if MODEL.draw("lost-kind", key) < 2 / 3 and _drop_connection():
            return answer
        return _ec2_error(500, "InternalError", "An internal error has occurred.")
    _log(service, action, app, "ok" if answer[0] < 400 else _error_code(answer[2]))
    return answer


def _unauthorized(response, service, action, app, params, account, region):
    """The UnauthorizedOperation message when the IAM policy refuses this
    call (see world/iam_policy.py), else None."""
    if IAM_POLICY is None or app != IAM_APP or service != "ec2":
        return None
    backend = response.ec2_backend

    def resource_tags(resource_id):
        # None for a resource that does not exist (any more): EC2 answers
        # its NotFound then, as to a call IAM allowed.
        stores = {"vol-": backend.volumes, "snap-": backend.snapshots, "ami-": backend.amis}
        store = next((v for k, v in stores.items() if resource_id.startswith(k)), None)
        if store is not None and resource_id not in store:
            return None
        if resource_id.startswith("i-"):
            try:
                backend.get_instance(resource_id)
            except Exception:
                return None
        return dict(backend.tags.get(resource_id, {}))

    def attached_instance(volume_id):
        try:
            attachment = backend.get_volume(volume_id).attachment
            return attachment.instance.id if attachment else None
        except Exception:
            return None

    user = f"arn:aws:iam::{account}:user/{IAM_APP}"
    return iam_policy.refusal(IAM_POLICY, action, params, account, region, resource_tags, attached_instance, user)


def _ebs_refusal(response, action, app):
    """IAM's refusal of an EBS direct call (see world/ebs_direct.py), else None."""
    if IAM_POLICY is None or app != IAM_APP:
        return None
    account, region = response.current_account, response.region
    backend = ec2_backends[account][region]
    snapshots, request_tags = ebs_direct.named(response, action)
    for snapshot_id in snapshots:
        if snapshot_id == "*":
            context = iam_policy.request_tag_context(request_tags or {})
        else:
            with LOCK:
                tags = dict(backend.tags.get(snapshot_id, {}))
            context = {f"aws:resourcetag/{k}".lower(): v for k, v in tags.items()}
        resource = iam_policy.arn("snapshot", snapshot_id, account, region)
        name = f"ebs:{action}"
        if iam_policy.decide(IAM_POLICY, name, resource, context) != "allow":
            user = f"arn:aws:iam::{account}:user/{IAM_APP}"
            return (
                f"User: {user} is not authorized to perform: {name} on resource: {resource} "
                f"because no identity-based policy allows the {name} action"
            )
    return None


def _error_code(body):
    """The error code of an EC2 error answer, for the log."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    start = text.find("<Code>")
    end = text.find("</Code>", start)
    return text[start + 6 : end] if start >= 0 and end > start else "error-answer"


BaseResponse.call_action = call_action


# --- 9: the world's own view, and moto's per-request overhead --------------
#
# The attacher needs, for every account and region, which volumes are
# attached where and which snapshots were taken of them. Asking through
# DescribeVolumes and DescribeSnapshots per target cost this one process
# more than the tool under test did, so the attacher reads one view of the
# whole emulator instead: GET /_world/attachments (JSON). It is not an EC2
# API, product code never calls it, and it shows what DescribeVolumes would
# (a volume counts as attached once its attachment is `attached`).

import functools
import json

from moto import backends as moto_backends
from moto.core import responses as core_responses
from moto.ec2.models import ec2_backends
from moto.moto_server.werkzeug_app import DomainDispatcherApplication


def _attachments_view():
    out = []
    with LOCK:
        for account, per_region in list(ec2_backends.items()):
            for region, backend in list(per_region.items()):
                volumes = []
                for v in list(backend.volumes.values()):
                    shown = v.shown_attachment
                    attached = shown is not None and shown.status in ("attached", "busy")
                    volumes.append({"id": v.id, "size": v.size, "instance": shown.instance.id if attached else None})
                snapshots = [
                    {"id": s.id, "volume": s.volume.id}
                    for s in list(backend.snapshots.values())
                    if getattr(s, "volume", None) is not None
                ]
                out.append({"account": account, "region": region, "volumes": volumes, "snapshots": snapshots})
    return json.dumps(out).encode()


_dispatch = DomainDispatcherApplication.__call__


def _dispatch_or_view(self, environ, start_response):
    if environ.get("PATH_INFO") == "/_world/attachments":
        body = _attachments_view()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return _dispatch(self, environ, start_response)


DomainDispatcherApplication.__call__ = _dispatch_or_view

# moto lists its own package directory on every request to find the
# service, and inspects the response class's methods on every call; both
# answers never change while it runs, so they are computed once.
_modules = tuple(moto_backends.list_of_moto_modules())
moto_backends.list_of_moto_modules = lambda: _modules
core_responses.method_names_from_class = functools.lru_cache(maxsize=None)(core_responses.method_names_from_class)

if __name__ == "__main__":
    from moto.server import main

    if CONFIG.faults or CONFIG.paced:
        print(f"local-world: {CONFIG.describe()}", file=sys.stderr, flush=True)
    # One log line per request on stderr costs this single process more
    # than some answers do; the world keeps its own log (api-calls.log).
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    main(sys.argv[1:])
