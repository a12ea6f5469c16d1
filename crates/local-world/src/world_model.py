# The world's model of how EC2 behaves in time and under load: per-call
# latency, how long resources stay in their pending states, per-(account,
# region) request token buckets, and the faults a test can turn on. Nothing
# here knows moto: moto_launch.py applies the model to moto's answers.
# docs/world.md lists every figure with its source.
#
# Variables (read once, at start; a bad value stops the world before it
# serves anything, with a message naming the variable):
#
#   LOCAL_WORLD_PACE        aws | instant (default aws). Under aws every
#                           EC2/STS call takes a latency drawn per call, and
#                           volumes, attachments, snapshots, AMIs and
#                           instances pass through their pending states.
#   LOCAL_WORLD_TIME_SCALE  factor on every modelled duration (latency and
#                           pending states; 1 = as long as in AWS). Default
#                           DEFAULT_TIME_SCALE. Token buckets refill at
#                           EC2's real rates whatever the scale.
#   LOCAL_WORLD_FAULTS      comma list of NAME=VALUE:
#                             throttle=P  share of calls answered
#                                         RequestLimitExceeded (503)
#                             error=P     share answered 500 InternalError or
#                                         503 Unavailable (nothing done)
#                             lag=D       a resource is unknown (NotFound) to
#                                         calls naming it, and left out of
#                                         lists, for a time drawn in 0..D
#                                         after it was created; a tag
#                                         change (CreateTags, DeleteTags)
#                                         is seen late for a time drawn
#                                         the same way
#                             lost=P      share of mutating calls whose
#                                         answer is lost: a third before EC2
#                                         acted (a dropped connection, nothing
#                                         done), the rest after (500
#                                         InternalError or a dropped
#                                         connection)
#                             hang=P      share of calls whose answer never
#                                         comes (held 10 minutes, then the
#                                         connection closed): half before
#                                         EC2 acted, half after
#                             fail=P      share of the snapshots and AMIs
#                                         a tool makes that end `error` /
#                                         `failed` after their pending time
#                             capacity=P  share of CreateVolume refused
#                                         InsufficientVolumeCapacity, of
#                                         RunInstances and StartInstances
#                                         InsufficientInstanceCapacity (500)
#                             load=P      share of every bucket that other
#                                         tools of the account use: a tool
#                                         starts with and refills only the
#                                         rest (EC2's buckets are per account)
#                           throttle applies to STS calls too (400
#                           Throttling).
#                           P in 0..1; D like 2s, 500ms, 1m (not scaled).
#                           A fault may be limited to some EC2 actions:
#                           lost=0.6@CreateVolume+RegisterImage (for lag,
#                           the actions that create or change tags).
#   LOCAL_WORLD_SEED        integer; every random decision is drawn from it,
#                           so a failing run can be replayed. Without it a
#                           seed is chosen and printed.
#
# Token buckets apply under pace=aws, or when any fault is on.

import hashlib
import os
import re
import threading
import time

DEFAULT_TIME_SCALE = 0.02
KNOWN_FAULTS = ("throttle", "error", "lag", "lost", "hang", "fail", "capacity", "load")
PACES = ("aws", "instant")

# Latency per call at scale 1, seconds (uniform in the range).
READ_LATENCY = (0.030, 0.080)
WRITE_LATENCY = (0.080, 0.200)

# Pending states at scale 1, seconds (uniform in the range).
VOLUME_CREATING = (2.0, 6.0)
ATTACHING = (1.0, 4.0)
DETACHING = (2.0, 6.0)
INSTANCE_PENDING = (10.0, 25.0)
INSTANCE_STOPPING = (15.0, 40.0)
INSTANCE_SHUTTING_DOWN = (10.0, 30.0)
AMI_REGISTERING = (3.0, 8.0)
# Validation of an aws:ec2:image parameter version (SSM answers first).
SSM_IMAGE_VALIDATION = (1.0, 5.0)
# A snapshot is pending for a fixed part plus the time to copy the blocks
# changed since the volume's previous snapshot (all written blocks for a
# first snapshot); a snapshot copy for a fixed part plus its data.
SNAPSHOT_FIXED = 15.0
SNAPSHOT_BYTES_PER_SECOND = 40 << 20
COPY_FIXED = 30.0
COPY_BYTES_PER_SECOND = 40 << 20
# EBS snapshot block size: changed bytes are counted in these.
SNAPSHOT_BLOCK = 512 << 10

# EC2 request rate limits per account and region, each API action with
# its own bucket: (bucket size, refill per second) by action category, and
# the actions the throttling page names with buckets of their own ("Request
# throttling for the Amazon EC2 API", EC2 developer guide; figures as of
# 2026, issue 17).
NON_MUTATING = (100, 20.0)
UNFILTERED_NON_MUTATING = (50, 10.0)
MUTATING = (50, 5.0)
RESOURCE_INTENSIVE = (50, 5.0)
RESOURCE_INTENSIVE_ACTIONS = frozenset(
    {
        "CreateImage",
        "CreateSnapshot",
        "CreateVolume",
        "RegisterImage",
    }
)
OWN_BUCKETS = {
    "CopyImage": (50, 1.0),
    "RunInstances": (5, 2.0),
    "CreateTags": (100, 10.0),
    "DeleteTags": (100, 10.0),
}
# The non-mutating actions whose calls without filters, ids or a page size
# draw on the smaller unfiltered bucket (the others keep their own).
UNFILTERED_ACTIONS = frozenset(
    {
        "DescribeInstances",
        "DescribeInstanceStatus",
        "DescribeNetworkInterfaces",
        "DescribeSecurityGroups",
        "DescribeSnapshots",
        "DescribeSpotInstanceRequests",
        "DescribeVolumes",
    }
)
READ_PREFIXES = ("Describe", "Get", "List", "Search")

# EC2 actions of those the world serves that take a ClientToken (checked
# against botocore's EC2 service model: each input shape's members).
CLIENT_TOKEN_ACTIONS = frozenset({"CopyImage", "CreateVolume", "RunInstances"})


# EC2's capacity refusals, server errors that make nothing ("Error codes
# for the Amazon EC2 API", server errors).
CAPACITY_CODES = {
    "CreateVolume": (
        "InsufficientVolumeCapacity",
        "Not enough EBS capacity for this volume in the Availability Zone (local world: capacity).",
    ),
    "RunInstances": (
        "InsufficientInstanceCapacity",
        "Not enough capacity for this instance type in the Availability Zone (local world: capacity).",
    ),
    "StartInstances": (
        "InsufficientInstanceCapacity",
        "Not enough capacity for this instance type in the Availability Zone (local world: capacity).",
    ),
}


class Refused(Exception):
    """A world variable with a value the world cannot use."""


def is_read(action):
    return action.startswith(READ_PREFIXES)


def parse_duration(text):
    """Seconds in `text` ("2s", "500ms", "1.5s", "1m"), or None."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)\s*", text)
    if not m:
        return None
    value = float(m.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


def parse_faults(text):
    """The faults and their shares, and the actions some shares are
    limited to."""
    faults, only = {}, {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if name not in KNOWN_FAULTS:
            raise Refused(f"LOCAL_WORLD_FAULTS: unknown fault '{name}' (known: {', '.join(KNOWN_FAULTS)})")
        if not sep or not value.strip():
            raise Refused(f"LOCAL_WORLD_FAULTS: '{name}' needs a value, like {name}={'2s' if name == 'lag' else '0.1'}")
        if name in faults:
            raise Refused(f"LOCAL_WORLD_FAULTS: '{name}' is given twice")
        value, at, actions = value.partition("@")
        if name == "lag":
            seconds = parse_duration(value)
            if seconds is None:
                raise Refused(f"LOCAL_WORLD_FAULTS: lag={value.strip()} is not a duration (like 2s, 500ms, 1m)")
            faults[name] = seconds
        else:
            try:
                share = float(value)
            except ValueError:
                share = None
            if share is None or not 0.0 <= share <= 1.0:
                raise Refused(f"LOCAL_WORLD_FAULTS: {name}={value.strip()} is not a share between 0 and 1")
            faults[name] = share
        if at:
            names = [a.strip() for a in actions.split("+")]
            bad = [a for a in names if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", a)]
            if bad or not names:
                raise Refused(f"LOCAL_WORLD_FAULTS: {name}=...@{actions.strip()} is not a list of actions like CreateVolume+RegisterImage")
            only[name] = frozenset(names)
    return faults, only


class Config:
    """The world variables, checked."""

    def __init__(self, pace="aws", scale=DEFAULT_TIME_SCALE, faults=None, seed=0, seed_given=True, only=None):
        self.pace = pace
        self.scale = scale
        self.faults = faults or {}
        self.only = only or {}
        self.seed = seed
        self.seed_given = seed_given

    @property
    def paced(self):
        return self.pace == "aws"

    @property
    def buckets(self):
        return self.paced or bool(self.faults)

    def describe(self):
        faults = ",".join(
            f"{k}={v}" + ("@" + "+".join(sorted(self.only[k])) if k in self.only else "") for k, v in self.faults.items()
        ) or "none"
        return f"pace={self.pace} time-scale={self.scale} faults={faults} seed={self.seed}"


def config_from_env(env):
    pace = env.get("LOCAL_WORLD_PACE", "").strip() or "aws"
    if pace not in PACES:
        raise Refused(f"LOCAL_WORLD_PACE: unknown pace '{pace}' (known: {', '.join(PACES)})")
    scale_text = env.get("LOCAL_WORLD_TIME_SCALE", "").strip()
    scale = DEFAULT_TIME_SCALE
    if scale_text:
        try:
            scale = float(scale_text)
        except ValueError:
            scale = -1.0
        if not 0.0 < scale <= 100.0:
            raise Refused(f"LOCAL_WORLD_TIME_SCALE: '{scale_text}' is not a factor above 0 (1 = AWS's own durations)")
    faults, only = parse_faults(env.get("LOCAL_WORLD_FAULTS", ""))
    seed_text = env.get("LOCAL_WORLD_SEED", "").strip()
    if seed_text:
        if not re.fullmatch(r"\d{1,19}", seed_text):
            raise Refused(f"LOCAL_WORLD_SEED: '{seed_text}' is not a non-negative integer")
        seed, given = int(seed_text), True
    else:
        seed, given = int.from_bytes(os.urandom(4), "little"), False
    return Config(pace, scale, faults, seed, given, only)


class Model:
    """Decisions for one world: latencies, durations, faults, buckets.

    Every random choice is a hash of the seed, what it is for, and the
    position of the call in its (account, region, action) sequence, so a
    target's calls meet the same decisions when the run is replayed,
    whatever the other targets do meanwhile."""

    def __init__(self, config):
        self.config = config
        self._lock = threading.Lock()
        self._counts = {}
        self._buckets = {}

    def next_call(self, account, region, action):
        """The call's place in its (account, region, action) sequence."""
        key = (account, region, action)
        with self._lock:
            n = self._counts.get(key, 0)
            self._counts[key] = n + 1
        return f"{account}/{region}/{action}/{n}"

    def draw(self, what, key):
        """A number in [0, 1) for `what` of call `key`."""
        h = hashlib.blake2b(f"{self.config.seed}|{what}|{key}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") / 2.0**64

    def between(self, what, key, low_high):
        low, high = low_high
        return (low + (high - low) * self.draw(what, key)) * self.config.scale

    def latency(self, action, key):
        if not self.config.paced:
            return 0.0
        return self.between("latency", key, READ_LATENCY if is_read(action) else WRITE_LATENCY)

    def chance(self, fault, key):
        """Whether `fault` strikes call `key` (account/region/action/n)."""
        share = self.config.faults.get(fault)
        only = self.config.only.get(fault)
        if only is not None and key.split("/")[2] not in only:
            return False
        return share is not None and self.draw(fault, key) < share

    def lag(self, key):
        """How long a resource made by call `key` stays unknown (or a tag
        change it made is seen late)."""
        only = self.config.only.get("lag")
        if only is not None and key.split("/")[2] not in only:
            return 0.0
        limit = self.config.faults.get("lag")
        return 0.0 if not limit else limit * self.draw("lag", key)

    def take_token(self, account, region, action, unfiltered):
        """False when the action's bucket is empty (RequestLimitExceeded)."""
        if not self.config.buckets:
            return True
        unfiltered = unfiltered and action in UNFILTERED_ACTIONS
        if is_read(action):
            size, rate = UNFILTERED_NON_MUTATING if unfiltered else NON_MUTATING
        elif action in OWN_BUCKETS:
            size, rate = OWN_BUCKETS[action]
        elif action in RESOURCE_INTENSIVE_ACTIONS:
            size, rate = RESOURCE_INTENSIVE
        else:
            size, rate = MUTATING
        key = (account, region, action, unfiltered)
        # What other tools of the account leave of the bucket.
        only = self.config.only.get("load")
        left = 1.0 - (self.config.faults.get("load", 0.0) if only is None or action in only else 0.0)
        size, rate = size * left, rate * left
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key, (float(size), now))
            tokens = min(float(size), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1.0, now)
            return True

    def pending(self, what, key, low_high):
        """Seconds a resource stays in a pending state (0 under instant)."""
        if not self.config.paced:
            return 0.0
        return self.between(what, key, low_high)

    def snapshot_seconds(self, changed_bytes):
        return (SNAPSHOT_FIXED + changed_bytes / SNAPSHOT_BYTES_PER_SECOND) * self.config.scale

    def copy_seconds(self, data_bytes):
        return (COPY_FIXED + data_bytes / COPY_BYTES_PER_SECOND) * self.config.scale


def _data_extents(fd, size):
    """(start, end) of the data regions of a sparse file."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def _blocks(extents):
    blocks = set()
    for start, end in extents:
        blocks.update(range(start // SNAPSHOT_BLOCK, (end + SNAPSHOT_BLOCK - 1) // SNAPSHOT_BLOCK))
    return blocks


def data_bytes(path):
    """Bytes of the 512 KiB blocks of `path` that hold data."""
    if not path or not os.path.exists(path):
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        return len(_blocks(_data_extents(fd, os.fstat(fd).st_size))) * SNAPSHOT_BLOCK
    finally:
        os.close(fd)


def changed_bytes(new, old):
    """Bytes of `new`'s 512 KiB blocks that differ from `old`'s (its
    non-zero blocks when there is no `old`): what an incremental EBS
    snapshot copies. Holes read as zeros in both files, so only the data
    regions of either are read and compared."""
    if not new or not os.path.exists(new):
        return 0
    fa = os.open(new, os.O_RDONLY)
    fb = os.open(old, os.O_RDONLY) if old and os.path.exists(old) else None
    try:
        extents = _data_extents(fa, os.fstat(fa).st_size)
        if fb is not None:
            extents += _data_extents(fb, os.fstat(fb).st_size)
        changed = set()
        for start, end in sorted(extents):
            pos = start
            while pos < end:
                block = pos // SNAPSHOT_BLOCK
                stop = min(end, (block + 1) * SNAPSHOT_BLOCK)
                if block not in changed:
                    n = stop - pos
                    a = os.pread(fa, n, pos).ljust(n, b"\0")
                    o = os.pread(fb, n, pos).ljust(n, b"\0") if fb is not None else bytes(n)
                    if a != o:
                        changed.add(block)
                pos = stop
        return len(changed) * SNAPSHOT_BLOCK
    finally:
        os.close(fa)
        if fb is not None:
            os.close(fb)
