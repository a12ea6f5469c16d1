# EC2's per-volume limits on CreateSnapshot, which moto lacks (5.1.22 and
# 5.2.5 alike):
#
# - SnapshotCreationPerVolumeRateExceeded: "The rate limit for creating
#   concurrent snapshots of an EBS volume has been exceeded. Wait at least
#   15 seconds between concurrent volume snapshots." (EC2 API reference,
#   "Error codes for the Amazon EC2 API", client errors).
# - ConcurrentSnapshotLimitExceeded: "You've reached the limit on the number
#   of concurrent snapshots you can create" (same page); the EBS quotas name
#   the limit per volume: at most 5 pending snapshots of one volume
#   ("Amazon EBS endpoints and quotas": concurrent snapshots per volume, 5).
#
# Both refuse before anything is made (HTTP 400). They apply to the calls
# the world models (a tool's, not the world's own), in real seconds
# whatever the time scale, as the request buckets do: what a tool must
# wait out is its own pause, which the scale does not shorten.

import threading
import time

from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import elastic_block_store as moto_ebs

# Seconds between two snapshots of one volume.
INTERVAL = 15.0
# Pending snapshots of one volume at most.
MAX_PENDING = 5

_LOCK = threading.Lock()
# Volume id -> monotonic time of its last snapshot a modelled call made.
_LAST = {}


def install(modelled):
    """Wrap CreateSnapshot; `modelled()` tells whether the call being
    served is a tool's (the limits apply) or the world's own."""
    backend = moto_ebs.EBSBackend
    create = backend.create_snapshot

    def create_snapshot(self, volume_id, *args, **kwargs):
        if modelled():
            self.get_volume(volume_id)  # InvalidVolume.NotFound first, as EC2
            now = time.monotonic()
            with _LOCK:
                last = _LAST.get(volume_id)
                if last is not None and now - last < INTERVAL:
                    raise EC2ClientError(
                        "SnapshotCreationPerVolumeRateExceeded",
                        "The maximum per volume CreateSnapshot request rate has been exceeded. "
                        "Use an increasing or variable sleep interval between requests.",
                    )
                pending = sum(
                    1
                    for s in list(self.snapshots.values())
                    if getattr(getattr(s, "volume", None), "id", None) == volume_id and s.status == "pending"
                )
                if pending >= MAX_PENDING:
                    raise EC2ClientError(
                        "ConcurrentSnapshotLimitExceeded",
                        f"Maximum number of concurrent snapshots ({MAX_PENDING}) for volume {volume_id} reached.",
                    )
                _LAST[volume_id] = now
        return create(self, volume_id, *args, **kwargs)

    backend.create_snapshot = create_snapshot
