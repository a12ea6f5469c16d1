# The EBS direct APIs as EBS answers them. moto 5.1.22 and 5.2.5 both model
# them with 512-byte blocks kept in memory, ignore ParentSnapshotId,
# ClientToken, Encrypted, KmsKeyArn and Timeout, check no checksum, make a
# stray volume for every snapshot, never complete the EC2 snapshot, and (5.1.22)
# answer block indexes as strings. Here, after the EBS API reference
# (StartSnapshot, PutSnapshotBlock, CompleteSnapshot, ListSnapshotBlocks,
# ListChangedBlocks, GetSnapshotBlock) and the EBS user guide ("Use EBS
# direct APIs", "Idempotency", "Checksums", "Endpoints and quotas"):
#
# - Blocks are 524288 bytes; PutSnapshotBlock takes exactly that many, with
#   ChecksumAlgorithm SHA256 and the base64 SHA-256 of the data, and refuses
#   a mismatch (ValidationException) before writing anything.
# - The snapshot is an EC2 snapshot (VolumeId vol-ffffffff, as EC2 shows
#   one EBS direct made), `pending` until completed, its bytes in the
#   world's snapshots/SNAP.img as for every snapshot here. A child of
#   ParentSnapshotId starts as its parent's bytes and blocks and inherits
#   its encryption and key; Encrypted or KmsKeyArn with a parent is refused.
#   An encrypted snapshot without a parent reads as noise, not zeros, where
#   no block was written (coldsnap#395); the world writes that noise into
#   the holes below the last block written, and leaves the rest sparse.
# - CompleteSnapshot answers `pending`; the EC2 snapshot then completes at
#   the world's pace for the bytes written, or ends `error` when
#   ChangedBlocksCount is not the number of blocks written, or the LINEAR
#   aggregate checksum (SHA-256 of the written blocks' SHA-256 digests in
#   block order, as coldsnap computes it) differs. Writes after completion
#   are refused.
# - ClientToken: StartSnapshot again with the same token and parameters
#   answers what it answered the first time (the snapshot as it was then:
#   `pending`, with its start time), whatever became of the snapshot since;
#   with other parameters, ConflictException.
# - Timeout (minutes, 10 to 4320, default 60, scaled by the world's time
#   scale): a pending snapshot nobody writes or completes for that long
#   ends `error`, and refuses writes.
# - Quotas, as throttling (RequestThrottledException) in real seconds:
#   PutSnapshotBlock and GetSnapshotBlock 1,000 per second per snapshot;
#   StartSnapshot and CompleteSnapshot 10 per second per account and
#   region; ListSnapshotBlocks and ListChangedBlocks 50. At most 100 pending
#   snapshots per account and region (ConcurrentLimitExceededException).
# - ListSnapshotBlocks lists a snapshot's blocks with data (a child's: its
#   parent's and its own), ListChangedBlocks the blocks written after the
#   first snapshot along the second's lineage (UNRELATED_SNAPSHOTS when the
#   first is not its ancestor), both paged (MaxResults, NextToken), with
#   integer indexes and block tokens GetSnapshotBlock checks.
# - Errors are JSON with their type in x-amzn-ErrorType, as the service's
#   REST-JSON protocol answers them.
#
# - Pace and faults (moto_launch.py's call_action, through call() here): a
#   tool's EBS call takes the pace's latency, and the fault model's
#   throttling (RequestThrottledException), server errors
#   (InternalServerException, 500), answers withheld, and, for StartSnapshot,
#   PutSnapshotBlock and CompleteSnapshot, answers lost before or after EBS
#   acted. A snapshot StartSnapshot made is unknown to PutSnapshotBlock and
#   CompleteSnapshot (ResourceNotFoundException) for the `lag=` time drawn
#   for the call, as EBS answers for a while after a start (the EBS direct
#   APIs' error reference: "the snapshot ... does not exist").
# - IAM (with the world's policy enforced, moto_launch.py section 10): each
#   call is authorized as ebs:ACTION on the snapshots it names, by their
#   ARN (arn:aws:ec2:REGION::snapshot/ID, the Service Authorization
#   Reference's resource for the EBS direct APIs), with their tags as
#   aws:ResourceTag/K; StartSnapshot on snapshot/* with the request's tags
#   as aws:RequestTag/K. A refusal is AccessDeniedException (403).
#
# The world's own calls (User-Agent app/local-world) are not throttled.
# Every PutSnapshotBlock is counted per snapshot (puts(), for tests).

import base64
import hashlib
import json
import os
import subprocess
import threading
import time

from moto.ebs import responses as ebs_responses
from moto.ec2.models import ec2_backends
from moto.ec2.models.elastic_block_store import Snapshot
from moto.ec2.utils import random_snapshot_id

from world import kms_keys

BLOCK = 524288
GIB = 1 << 30
MAX_PENDING = 100
RATES = {
    "PutSnapshotBlock": 1000.0,
    "GetSnapshotBlock": 1000.0,
    "StartSnapshot": 10.0,
    "CompleteSnapshot": 10.0,
    "ListSnapshotBlocks": 50.0,
    "ListChangedBlocks": 50.0,
}
PER_SNAPSHOT = ("PutSnapshotBlock", "GetSnapshotBlock")

_LOCK = threading.RLock()
# Snapshot id -> _Direct, for snapshots made here.
_DIRECT = {}
# Snapshots StartSnapshot has just made for a tool (not replayed answers).
_JUST_STARTED = {}
# (account, region, client token) -> (parameters, snapshot id).
_TOKENS = {}
# Bucket key -> [tokens, last refill (monotonic)].
_BUCKETS = {}
# Snapshot id -> blocks with data, for snapshots made otherwise (cached).
_FOUND = {}
_HOOKS = {}


class EbsError(Exception):
    def __init__(self, status, kind, message, reason=None):
        super().__init__(message)
        self.status, self.kind, self.message, self.reason = status, kind, message, reason

    def answer(self):
        body = {"Message": self.message, "message": self.message}
        if self.reason:
            body["Reason"] = self.reason
        headers = {"x-amzn-ErrorType": self.kind, "Content-Type": "application/json", "status": self.status}
        return self.status, headers, json.dumps(body)


def _validation(message, reason="INVALID_PARAMETER_VALUE"):
    return EbsError(400, "ValidationException", message, reason)


def _not_found(snapshot_id):
    return EbsError(404, "ResourceNotFoundException", f"The snapshot '{snapshot_id}' does not exist.", "SNAPSHOT_NOT_FOUND")


class _Direct:
    def __init__(self, account, region, snapshot, parent, size_gib, timeout_s):
        self.account, self.region, self.snapshot = account, region, snapshot
        self.parent = parent
        self.size_gib = size_gib
        self.timeout_s = timeout_s
        self.written = {}  # block index -> raw SHA-256 of its data
        self.status = "pending"
        self.started_at = time.time()
        self.touched = time.monotonic()
        self.puts = 0
        # Until then PutSnapshotBlock and CompleteSnapshot do not know it.
        self.known_at = 0.0

    def blocks(self):
        return _blocks(self.parent) | set(self.written) if self.parent else set(self.written)


def _file(snapshot_id):
    return os.path.join(_HOOKS["world"], "snapshots", f"{snapshot_id}.img")


def _blocks(snapshot_id):
    """A snapshot's blocks with data."""
    direct = _DIRECT.get(snapshot_id)
    if direct is not None:
        return direct.blocks()
    if snapshot_id not in _FOUND:
        found = set()
        path = _file(snapshot_id)
        if os.path.exists(path):
            # Only the file's data regions are read (a volume's copy is
            # sparse): a 1 GiB volume with 40 MiB written reads 40 MiB.
            with open(path, "rb") as f:
                fd, end, at = f.fileno(), os.fstat(f.fileno()).st_size, 0
                while at < end:
                    try:
                        at = os.lseek(fd, at, os.SEEK_DATA)
                    except OSError:
                        break
                    hole = os.lseek(fd, at, os.SEEK_HOLE)
                    index = at // BLOCK
                    while index * BLOCK < hole:
                        f.seek(index * BLOCK)
                        data = f.read(BLOCK)
                        if data.count(0) != len(data):
                            found.add(index)
                        index += 1
                    at = index * BLOCK
        _FOUND[snapshot_id] = found
    return _FOUND[snapshot_id]


def _lineage(snapshot_id):
    """The snapshot and its ancestors, nearest first."""
    chain = [snapshot_id]
    while snapshot_id in _DIRECT and _DIRECT[snapshot_id].parent:
        snapshot_id = _DIRECT[snapshot_id].parent
        chain.append(snapshot_id)
    return chain


def _throttle(action, key):
    rate = RATES[action]
    now = time.monotonic()
    bucket = _BUCKETS.setdefault((action, key), [rate, now])
    bucket[0] = min(rate, bucket[0] + (now - bucket[1]) * rate)
    bucket[1] = now
    if bucket[0] < 1.0:
        reason = "RESOURCE_LEVEL_THROTTLE" if action in PER_SNAPSHOT else "ACCOUNT_THROTTLED"
        raise EbsError(400, "RequestThrottledException", f"{action}: rate exceeded", reason)
    bucket[0] -= 1.0


def _expire(direct):
    """End a pending snapshot nobody wrote or completed within its timeout."""
    if direct.status == "pending" and time.monotonic() - direct.touched > direct.timeout_s:
        direct.status = "error"
        _HOOKS["fail"](direct.snapshot)


def _owned(response, snapshot_id):
    direct = _DIRECT.get(snapshot_id)
    if direct is None or (direct.account, direct.region) != (response.current_account, response.region):
        raise _not_found(snapshot_id)
    if _modelled(response) and time.monotonic() < direct.known_at:
        raise _not_found(snapshot_id)
    _expire(direct)
    return direct


def _ec2_snapshot(response, snapshot_id):
    """An EC2 snapshot the caller may read (its own, or shared with it)."""
    backend = ec2_backends[response.current_account][response.region]
    snapshot = backend.snapshots.get(snapshot_id)
    if snapshot is None:
        raise _not_found(snapshot_id)
    return snapshot


def _modelled(response):
    return "app/local-world" not in response.headers.get("User-Agent", "")


def _serve(action, key_of):
    """Wrap one EBSResponse method: quotas, then the action; errors as EBS
    answers them."""

    def method(self):
        try:
            with _LOCK:
                if _modelled(self):
                    _throttle(action, key_of(self))
                return _ACTIONS[action](self)
        except EbsError as e:
            return e.answer()

    return method


def _path(response):
    return response.parsed_url.path.rstrip("/").split("/")


def _start(self):
    params = json.loads(self.body or b"{}")
    account, region = self.current_account, self.region
    size = params.get("VolumeSize")
    if not isinstance(size, int) or not 1 <= size <= 65536:
        raise _validation(f"VolumeSize must be 1 to 65536 GiB, not {size!r}", "INVALID_VOLUME_SIZE")
    timeout = params.get("Timeout", 60)
    if not isinstance(timeout, int) or not 10 <= timeout <= 4320:
        raise _validation(f"Timeout must be 10 to 4320 minutes, not {timeout!r}")
    token = params.get("ClientToken")
    compared = {k: v for k, v in params.items() if k != "ClientToken"}
    if token:
        known = _TOKENS.get((account, region, token))
        if known is not None:
            if known[0] != compared:
                raise EbsError(
                    409,
                    "ConflictException",
                    "The request uses the same client token as a previous, but non-identical request.",
                )
            # EBS answers what it answered the first time, not how the
            # snapshot is now (it may have completed, failed or gone since).
            return 201, {"status": 201}, known[2]
    parent = params.get("ParentSnapshotId")
    encrypted = bool(params.get("Encrypted"))
    key = params.get("KmsKeyArn")
    backend = ec2_backends[account][region]
    if parent:
        if encrypted or key:
            raise _validation("Encrypted and KmsKeyArn cannot be given with ParentSnapshotId: a child takes its parent's")
        source = _ec2_snapshot(self, parent)
        if source.status != "completed":
            raise _validation(f"The parent snapshot '{parent}' is not completed.", "INVALID_SNAPSHOT_ID")
        parent_bytes = os.path.getsize(_file(parent)) if os.path.exists(_file(parent)) else 0
        if size * GIB < parent_bytes:
            raise _validation(f"VolumeSize {size} GiB is smaller than the parent snapshot", "INVALID_VOLUME_SIZE")
        encrypted, key = source.encrypted, source.kms_key_id
    elif key and not encrypted:
        raise _validation("KmsKeyArn needs Encrypted")
    elif encrypted:
        # The key given, else the account's default EBS key (aws/ebs until
        # changed), by its ARN, as CreateVolume does.
        if not key:
            if not backend.default_kms_key_id:
                backend._create_default_encryption_key()
            key = backend.default_kms_key_id
        found = kms_keys.key_of(account, region, key)
        if found is None:
            raise _validation(f"The KMS key '{key}' does not exist.", "INVALID_CUSTOMER_KEY")
        key = found.arn
    pending = sum(1 for d in _DIRECT.values() if (d.account, d.region, d.status) == (account, region, "pending"))
    if _modelled(self) and pending >= MAX_PENDING:
        raise EbsError(
            400,
            "ConcurrentLimitExceededException",
            f"You have reached the limit of {MAX_PENDING} concurrent snapshots in progress.",
        )
    snapshot_id = random_snapshot_id()
    volume = _Volume(size, backend)
    snapshot = Snapshot(backend, snapshot_id, volume, params.get("Description", ""), encrypted=encrypted, kms_key_id=key)
    tags = {t["Key"]: t["Value"] for t in params.get("Tags") or []}
    if tags:
        snapshot.add_tags(tags)
    path = _file(snapshot_id)
    if parent and os.path.exists(_file(parent)):
        subprocess.run(["cp", "--sparse=always", _file(parent), path + ".part"], check=True)
    else:
        open(path + ".part", "wb").close()
    with open(path + ".part", "r+b") as f:
        f.truncate(size * GIB)
    os.rename(path + ".part", path)
    backend.snapshots[snapshot_id] = snapshot
    direct = _Direct(account, region, snapshot, parent, size, timeout * 60 * _HOOKS["scale"]())
    direct.tags = params.get("Tags") or []
    _DIRECT[snapshot_id] = direct
    if _modelled(self):
        _JUST_STARTED[snapshot_id] = True
    _HOOKS["pending"](snapshot)
    answer = json.dumps(_describe(direct))
    if token:
        _TOKENS[(account, region, token)] = (compared, snapshot_id, answer)
    return 201, {"status": 201}, answer


class _Volume:
    """What EC2 shows as a snapshot's volume when EBS direct made it."""

    def __init__(self, size, backend):
        self.id = "vol-ffffffff"
        self.size = size
        self.ec2_backend = backend
        self.zone = None


def _describe(direct):
    s = direct.snapshot
    answer = {
        "SnapshotId": s.id,
        "OwnerId": direct.account,
        "Status": direct.status,
        "StartTime": direct.started_at,
        "VolumeSize": direct.size_gib,
        "BlockSize": BLOCK,
        "Tags": direct.tags,
        "SseType": "sse-kms" if s.encrypted else "none",
    }
    if direct.parent:
        answer["ParentSnapshotId"] = direct.parent
    if s.kms_key_id:
        answer["KmsKeyArn"] = s.kms_key_id
    return answer


def _put(self):
    parts = _path(self)
    snapshot_id, index_text = parts[-3], parts[-1]
    direct = _owned(self, snapshot_id)
    if direct.status != "pending":
        raise _validation(f"The snapshot '{snapshot_id}' is {direct.status}: no block can be written to it.", "INVALID_SNAPSHOT_ID")
    try:
        index = int(index_text)
    except ValueError:
        raise _validation(f"BlockIndex '{index_text}' is not a number", "INVALID_BLOCK") from None
    if not 0 <= index < direct.size_gib * GIB // BLOCK:
        raise _validation(f"BlockIndex {index} is outside the snapshot's {direct.size_gib} GiB", "INVALID_BLOCK")
    headers = {k.lower(): v for k, v in self.headers.items()}
    data = self.body if isinstance(self.body, bytes) else (self.body or "").encode()
    length = headers.get("x-amz-data-length")
    if length != str(BLOCK) or len(data) != BLOCK:
        raise _validation(f"DataLength must be {BLOCK} (given {length}, body {len(data)} bytes)")
    if headers.get("x-amz-checksum-algorithm") != "SHA256":
        raise _validation("ChecksumAlgorithm must be SHA256")
    digest = hashlib.sha256(data).digest()
    if headers.get("x-amz-checksum") != base64.b64encode(digest).decode():
        raise _validation("The checksum does not match the block's data.")
    with open(_file(snapshot_id), "r+b") as f:
        f.seek(index * BLOCK)
        f.write(data)
    direct.written[index] = digest
    direct.touched = time.monotonic()
    direct.puts += 1
    answer = {"status": 201, "x-amz-Checksum": headers["x-amz-checksum"], "x-amz-Checksum-Algorithm": "SHA256"}
    return 201, answer, "{}"


def _complete(self):
    snapshot_id = _path(self)[-1]
    direct = _owned(self, snapshot_id)
    headers = {k.lower(): v for k, v in self.headers.items()}
    if direct.status == "pending":
        count = headers.get("x-amz-changedblockscount")
        if count is None or not count.isdigit():
            raise _validation("ChangedBlocksCount is required")
        ok = int(count) == len(direct.written)
        given = headers.get("x-amz-checksum")
        if given is not None:
            if (headers.get("x-amz-checksum-algorithm"), headers.get("x-amz-checksum-aggregation-method")) != (
                "SHA256",
                "LINEAR",
            ):
                raise _validation("The aggregate checksum must be SHA256, LINEAR")
            joined = b"".join(direct.written[i] for i in sorted(direct.written))
            ok = ok and given == base64.b64encode(hashlib.sha256(joined).digest()).decode()
        if ok and direct.snapshot.encrypted and not direct.parent and direct.written:
            # Never-written blocks of an encrypted snapshot read as noise.
            # Written out up to the last block written (the holes a tool
            # left inside what it wrote); past it the file stays sparse,
            # so that a test's snapshot of a small image on a 1 GiB volume
            # does not cost a gigabyte of disk.
            noise = hashlib.sha256(snapshot_id.encode()).digest() * (BLOCK // 32)
            with open(_file(snapshot_id), "r+b") as f:
                for i in range(max(direct.written)):
                    if i not in direct.written:
                        f.seek(i * BLOCK)
                        f.write(noise)
        if ok:
            direct.status = "completed"
            _HOOKS["complete"](direct.snapshot, len(direct.written) * BLOCK)
        else:
            direct.status = "error"
            _HOOKS["fail"](direct.snapshot)
        return 202, {"status": 202}, json.dumps({"Status": "pending" if ok else "error"})
    return 202, {"status": 202}, json.dumps({"Status": direct.status})


def _readable(self, snapshot_id):
    """A snapshot the caller may read, completed."""
    snapshot = _ec2_snapshot(self, snapshot_id)
    direct = _DIRECT.get(snapshot_id)
    if direct is not None:
        _expire(direct)
    if snapshot.status != "completed" and (direct is None or direct.status != "completed"):
        raise _validation(f"The snapshot '{snapshot_id}' is not completed.", "INVALID_SNAPSHOT_ID")
    return snapshot


def _token(snapshot_id, index):
    return base64.urlsafe_b64encode(f"{snapshot_id}/{index}".encode()).decode()


def _page(self, indexes, make):
    query = self._get_params()
    max_results = int(query.get("maxResults", 10000))
    if not 100 <= max_results <= 10000:
        raise _validation(f"MaxResults must be 100 to 10000, not {max_results}")
    start = int(query.get("startingBlockIndex", 0))
    token = query.get("pageToken")
    if token:
        try:
            start = int(base64.urlsafe_b64decode(token.encode()).decode())
        except ValueError:
            raise _validation("The page token is not valid.", "INVALID_PAGE_TOKEN") from None
    chosen = [i for i in sorted(indexes) if i >= start]
    page, rest = chosen[:max_results], chosen[max_results:]
    answer = {"ExpiryTime": time.time() + 3600, "BlockSize": BLOCK, "items": [make(i) for i in page]}
    if rest:
        answer["NextToken"] = base64.urlsafe_b64encode(str(rest[0]).encode()).decode()
    return answer


def _size_gib(snapshot):
    return getattr(snapshot.volume, "size", None)


def _list(self):
    snapshot_id = _path(self)[-2]
    snapshot = _readable(self, snapshot_id)
    answer = _page(self, _blocks(snapshot_id), lambda i: {"BlockIndex": i, "BlockToken": _token(snapshot_id, i)})
    answer["Blocks"] = answer.pop("items")
    answer["VolumeSize"] = _size_gib(snapshot)
    return 200, {"status": 200}, json.dumps(answer)


def _changed(self):
    second = _path(self)[-2]
    snapshot = _readable(self, second)
    first = self._get_params().get("firstSnapshotId")
    if first:
        _readable(self, first)
        chain = _lineage(second)
        if first not in chain:
            raise _validation(f"The snapshots '{first}' and '{second}' are not of one lineage.", "UNRELATED_SNAPSHOTS")
        changed = set()
        for snapshot_id in chain[: chain.index(first)]:
            changed |= set(_DIRECT[snapshot_id].written)
        in_first = _blocks(first)
    else:
        changed, in_first = _blocks(second), set()

    def item(i):
        entry = {"BlockIndex": i, "SecondBlockToken": _token(second, i)}
        if i in in_first:
            entry["FirstBlockToken"] = _token(first, i)
        return entry

    answer = _page(self, changed, item)
    answer["ChangedBlocks"] = answer.pop("items")
    answer["VolumeSize"] = _size_gib(snapshot)
    return 200, {"status": 200}, json.dumps(answer)


def _get(self):
    parts = _path(self)
    snapshot_id, index_text = parts[-3], parts[-1]
    _readable(self, snapshot_id)
    token = self._get_params().get("blockToken")
    if token != _token(snapshot_id, index_text):
        raise _validation("The block token is not valid for this block.", "INVALID_BLOCK_TOKEN")
    with open(_file(snapshot_id), "rb") as f:
        f.seek(int(index_text) * BLOCK)
        data = f.read(BLOCK).ljust(BLOCK, b"\0")
    headers = {
        "status": 200,
        "x-amz-Checksum": base64.b64encode(hashlib.sha256(data).digest()).decode(),
        "x-amz-Checksum-Algorithm": "SHA256",
        "x-amz-Data-Length": str(BLOCK),
        "Content-Type": "application/octet-stream",
    }
    return 200, headers, data


_ACTIONS = {
    "StartSnapshot": _start,
    "PutSnapshotBlock": _put,
    "CompleteSnapshot": _complete,
    "ListSnapshotBlocks": _list,
    "ListChangedBlocks": _changed,
    "GetSnapshotBlock": _get,
}


def throttled(action):
    return EbsError(400, "RequestThrottledException", f"{action}: rate exceeded", "ACCOUNT_THROTTLED").answer()


def internal_error():
    return EbsError(500, "InternalServerException", "An internal error has occurred.").answer()


MUTATING = ("StartSnapshot", "PutSnapshotBlock", "CompleteSnapshot")


def named(response, action):
    """The snapshots an EBS call acts on, and the tags its request gives
    (StartSnapshot's new snapshot is "*", with the request's tags)."""
    path = _path(response)
    if action == "StartSnapshot":
        params = json.loads(response.body or b"{}")
        return ["*"], {t.get("Key"): t.get("Value", "") for t in params.get("Tags") or []}
    if action in ("PutSnapshotBlock", "GetSnapshotBlock"):
        return [path[-3]], None
    if action == "CompleteSnapshot":
        return [path[-1]], None
    snapshots = [path[-2]]
    first = response._get_params().get("firstSnapshotId") if action == "ListChangedBlocks" else None
    return snapshots + ([first] if first else []), None


def access_denied(message):
    return EbsError(403, "AccessDeniedException", message, "UNAUTHORIZED_ACCOUNT").answer()


def call(response, action, app, model, serve, log, withhold, can_drop, drop, refusal=lambda: None):
    """A tool's EBS call under the world's pace, faults and IAM. `serve()`
    answers it as EBS would; `refusal()` is IAM's word on it (None: allowed);
    the rest are moto_launch.py's (the fault model, the log, withholding and
    dropping an answer)."""
    key = model.next_call(response.current_account, response.region, action)
    time.sleep(model.latency(action, key))
    if model.chance("throttle", key):
        log("throttle")
        return throttled(action)
    if model.chance("error", key):
        log("error")
        return internal_error()
    mutating = action in MUTATING
    withheld = model.chance("hang", key)
    if withheld and model.draw("hang-kind", key) < 0.5:
        log("hang")
        return withhold(key, internal_error())
    if mutating and model.chance("lost", key) and model.draw("lost-kind", key) < 1 / 3 and can_drop():
        log("lost")
        drop()
        return internal_error()
    refused = refusal()
    if refused is not None:
        log("AccessDeniedException")
        return access_denied(refused)
    answer = serve()
    if action == "StartSnapshot" and answer[0] == 201:
        lag = model.lag(key)
        with _LOCK:
            snapshot_id = json.loads(answer[2]).get("SnapshotId")
            # Only a snapshot this call made: a replayed answer names one
            # known already.
            direct = _DIRECT.get(snapshot_id) if _JUST_STARTED.pop(snapshot_id, False) else None
            if direct is not None and lag > 0:
                direct.known_at = time.monotonic() + lag
    if withheld:
        log("hang")
        return withhold(key, answer)
    if mutating and answer[0] < 300 and model.chance("lost", key):
        log("lost")
        if model.draw("lost-kind", key) < 2 / 3 and drop():
            return answer
        return internal_error()
    failed = answer[0] >= 400 and isinstance(answer[1], dict) and answer[1].get("x-amzn-ErrorType")
    log(failed or "ok")
    return answer


def puts(snapshot_id):
    """PutSnapshotBlock calls that wrote to the snapshot."""
    with _LOCK:
        direct = _DIRECT.get(snapshot_id)
        return direct.puts if direct else 0


def install(world, scale, pending, complete, fail):
    """Serve EBS's direct APIs here. `world` is $LOCAL_WORLD_DIR; `scale()`
    the time scale; `pending(snapshot)` keeps an EC2 snapshot pending;
    `complete(snapshot, bytes)` lets it complete at the world's pace for
    that many bytes; `fail(snapshot)` ends it `error`."""
    _HOOKS.update(world=world, scale=scale, pending=pending, complete=complete, fail=fail)
    os.makedirs(os.path.join(world, "snapshots"), exist_ok=True)
    account_region = lambda r: (r.current_account, r.region)  # noqa: E731
    snapshot_of = lambda r: _path(r)[-3]  # noqa: E731
    cls = ebs_responses.EBSResponse
    cls.start_snapshot = _serve("StartSnapshot", account_region)
    cls.put_snapshot_block = _serve("PutSnapshotBlock", snapshot_of)
    cls.complete_snapshot = _serve("CompleteSnapshot", account_region)
    cls.list_snapshot_blocks = _serve("ListSnapshotBlocks", account_region)
    cls.list_changed_blocks = _serve("ListChangedBlocks", account_region)
    cls.get_snapshot_block = _serve("GetSnapshotBlock", snapshot_of)
