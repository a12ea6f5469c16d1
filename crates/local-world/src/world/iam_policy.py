# IAM as EC2 applies it to a tool's calls: every EC2 call the tool makes is
# evaluated against the identity policy the product ships
# (deploy/ami-publisher-iam-policy.json), and refused with
# UnauthorizedOperation (HTTP 403) when the policy does not allow it. moto
# checks IAM only when asked, and then without resource-level permissions
# or tag conditions, which is what a tag-scoped policy is made of.
#
# Sources, as this module reads them:
# - IAM User Guide, "Policy evaluation logic": an explicit Deny wins; else
#   an Allow whose Action, Resource and Condition all match; else the
#   request is implicitly denied. A request naming several resources needs
#   every one of them allowed.
# - IAM User Guide, "IAM JSON policy elements: Condition operators": String
#   (Equals, NotEquals, EqualsIgnoreCase, Like, NotLike), Arn (Equals,
#   Like, NotEquals, NotLike), Bool, Null; the ForAllValues: and
#   ForAnyValue: set operators; the IfExists suffix. A condition on a key
#   the request lacks is false, but for Null, the negated operators, the
#   IfExists forms and ForAllValues (vacuously true); values within one
#   operator are ORed, keys and operators ANDed; keys are case-insensitive,
#   values case-sensitive (but for ...IgnoreCase).
# - EC2, "Service Authorization Reference: Actions, resources, and condition
#   keys for Amazon EC2": which resources each action is authorized on (for
#   example CreateSnapshot on the new snapshot and on the source volume,
#   AttachVolume on the instance and the volume, RunInstances on the
#   instance, image, subnet, security groups, network interface, volumes and
#   key pair), and that aws:ResourceTag/K and ec2:ResourceTag/K name the
#   resource's tags, aws:RequestTag/K and aws:TagKeys the tags in the
#   request.
# - EC2 User Guide, "Grant permission to tag Amazon EC2 resources during
#   creation": a create with TagSpecifications is also authorized as
#   ec2:CreateTags on the new resource, with ec2:CreateAction set to the
#   create's action.
# - EC2 API reference, "Error codes": UnauthorizedOperation, "You are not
#   authorized to perform this operation." (EC2 adds an encoded message
#   that sts:DecodeAuthorizationMessage reads; here its plain form follows).
#
# A resource a call names that does not exist (any more) is not authorized
# on: EC2 answers its NotFound error, as it does to a caller whose policy
# allows the call (the world's assumption: EC2's documentation does not say
# which answer comes first; a tool that retries a delete whose answer was
# lost must be told "gone", and is, on the unscoped policies it replaces).
#
# Not modelled: policies other than the tool's identity policy (SCPs,
# permission boundaries, session policies, resource policies, KMS key
# policies), iam:PassRole (an IAM action, not an EC2 one), and condition
# keys the shipped policy does not use (an unknown key in the policy is an
# error at start, not a silent match).

import base64
import fnmatch
import json
import re

SERVICE = "ec2"

# The resource kinds by id prefix, and their ARN forms. Images and
# snapshots are public kinds: their ARNs carry no account.
_KINDS = {
    "vol-": "volume",
    "snap-": "snapshot",
    "ami-": "image",
    "i-": "instance",
    "sg-": "security-group",
    "subnet-": "subnet",
    "eni-": "network-interface",
    "vpc-": "vpc",
    "key-": "key-pair",
}
_NO_ACCOUNT = ("image", "snapshot")

KNOWN_KEYS = ("aws:requesttag/", "aws:resourcetag/", "ec2:resourcetag/", "aws:tagkeys", "ec2:createaction")
KNOWN_OPERATORS = (
    "StringEquals",
    "StringNotEquals",
    "StringEqualsIgnoreCase",
    "StringNotEqualsIgnoreCase",
    "StringLike",
    "StringNotLike",
    "ArnEquals",
    "ArnLike",
    "ArnNotEquals",
    "ArnNotLike",
    "Bool",
    "Null",
)


class PolicyError(ValueError):
    pass


def load(path):
    """The policy at `path`, checked for what this evaluator understands."""
    with open(path) as f:
        policy = json.load(f)
    for st in _statements(policy):
        if st.get("Effect") not in ("Allow", "Deny"):
            raise PolicyError(f"statement {st.get('Sid')}: Effect must be Allow or Deny")
        if "NotAction" in st or "NotResource" in st or "Principal" in st:
            raise PolicyError(f"statement {st.get('Sid')}: NotAction, NotResource and Principal are not modelled")
        for op, keys in st.get("Condition", {}).items():
            base = _operator(op)[1]
            if base not in KNOWN_OPERATORS:
                raise PolicyError(f"statement {st.get('Sid')}: condition operator {op} is not modelled")
            for key in keys:
                k = key.lower()
                if not (k.startswith(KNOWN_KEYS) or k.startswith(("iam:", "kms:", "ssm:"))):
                    raise PolicyError(f"statement {st.get('Sid')}: condition key {key} is not modelled")
    return policy


def _statements(policy):
    st = policy.get("Statement", [])
    return [st] if isinstance(st, dict) else st


def _listed(v):
    return v if isinstance(v, list) else [v]


def _operator(op):
    """(set prefix or None, base operator, if_exists)."""
    prefix = None
    for p in ("ForAllValues:", "ForAnyValue:"):
        if op.startswith(p):
            prefix, op = p[:-1], op[len(p) :]
    if_exists = op.endswith("IfExists")
    if if_exists:
        op = op[: -len("IfExists")]
    return prefix, op, if_exists


def _like(value, pattern):
    # IAM's wildcards: * any run, ? one character; nothing else is special.
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def _match_one(base, value, pattern):
    if base in ("StringEquals", "StringNotEquals", "ArnEquals", "ArnNotEquals"):
        return value == pattern
    if base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        return value.lower() == pattern.lower()
    if base in ("StringLike", "StringNotLike", "ArnLike", "ArnNotLike"):
        return _like(value, pattern)
    if base == "Bool":
        return value.lower() == str(pattern).lower()
    raise PolicyError(f"operator {base}")


def _negated(base):
    return "Not" in base


def condition_holds(op, key, patterns, context):
    """Whether one operator's test of one key holds in `context` (a dict
    of lower-cased keys to a string or a list of strings)."""
    prefix, base, if_exists = _operator(op)
    patterns = [str(p) for p in _listed(patterns)]
    present = key.lower() in context
    if base == "Null":
        # "true": the key must be absent; "false": present.
        return all((p.lower() == "true") != present for p in patterns)
    if not present:
        if prefix == "ForAllValues":
            return True
        return if_exists or (_negated(base) and prefix is None)
    values = _listed(context[key.lower()])
    positive = base.replace("Not", "") if _negated(base) else base

    def any_pattern(v):
        return any(_match_one(positive, v, p) for p in patterns)

    if prefix == "ForAllValues":
        return all(any_pattern(v) != _negated(base) for v in values)
    if prefix == "ForAnyValue":
        return any(any_pattern(v) != _negated(base) for v in values)
    hit = any(any_pattern(v) for v in values)
    return hit != _negated(base)


def _statement_matches(st, action, arn, context):
    if not any(_like(action.lower(), a.lower()) for a in _listed(st.get("Action", []))):
        return False
    if not any(_like(arn, r) for r in _listed(st.get("Resource", []))):
        return False
    for op, keys in st.get("Condition", {}).items():
        for key, patterns in keys.items():
            if not condition_holds(op, key, patterns, context):
                return False
    return True


def decide(policy, action, arn, context):
    """'allow', 'deny' (an explicit Deny) or 'implicit' (nothing allows)."""
    allowed = False
    for st in _statements(policy):
        if _statement_matches(st, action, arn, context):
            if st["Effect"] == "Deny":
                return "deny"
            allowed = True
    return "allow" if allowed else "implicit"


# --- EC2 requests as IAM sees them -----------------------------------------


def _values(params, prefix):
    """Values of NAME.1, NAME.2, ... (or of NAME alone) in a query."""
    out = []
    for k, v in params.items():
        if k == prefix or re.fullmatch(re.escape(prefix) + r"\.\d+", k):
            out.extend(_listed(v))
    return out


def _one(params, name):
    v = params.get(name)
    return _listed(v)[0] if v else None


def _tags_in(params, base):
    """{key: value} of BASE.N.Key / BASE.N.Value."""
    tags = {}
    for k, v in params.items():
        m = re.fullmatch(re.escape(base) + r"\.(\d+)\.Key", k)
        if m:
            tags[_listed(v)[0]] = _one(params, f"{base}.{m.group(1)}.Value") or ""
    return tags


def _specified_tags(params, kind):
    """The tags TagSpecification.N gives resources of `kind`."""
    tags = {}
    for k, v in params.items():
        m = re.fullmatch(r"TagSpecification\.(\d+)\.ResourceType", k)
        if m and _listed(v)[0] == kind:
            tags.update(_tags_in(params, f"TagSpecification.{m.group(1)}.Tag"))
    return tags


def arn(kind, resource, account, region):
    owner = "" if kind in _NO_ACCOUNT else account
    return f"arn:aws:ec2:{region}:{owner}:{kind}/{resource}"


def _kind_of(resource_id):
    for prefix, kind in _KINDS.items():
        if resource_id.startswith(prefix):
            return kind
    return None


class Request:
    """What IAM authorizes for one call: (ARN, context) pairs, each of which
    must be allowed for the action, and the tagging a create implies."""

    def __init__(self, account, region, resource_tags):
        self.account, self.region = account, region
        # resource id -> {key: value}
        self.resource_tags = resource_tags
        self.checks = []
        # Keys of the request itself (its tags), in the context of every
        # resource it is authorized on.
        self.context = {}

    def existing(self, resource_id, kind=None, extra=None):
        kind = kind or _kind_of(resource_id) or "unknown"
        tags = self.resource_tags(resource_id)
        if tags is None:
            # No such resource (or no longer): EC2 answers its NotFound, so
            # that a retried delete of what is gone is told "gone", not
            # "refused".
            return
        context = dict(self.context)
        for k, v in tags.items():
            context[f"aws:resourcetag/{k}".lower()] = v
            context[f"ec2:resourcetag/{k}".lower()] = v
        context.update(extra or {})
        self.checks.append((None, arn(kind, resource_id, self.account, self.region), context, resource_id))

    def new(self, kind, tags, extra=None):
        context = dict(self.context)
        context.update(request_tag_context(tags))
        context.update(extra or {})
        self.checks.append((None, arn(kind, "*", self.account, self.region), context, f"a new {kind}"))

    def tagging_on_create(self, action, kind, tags):
        if tags:
            context = request_tag_context(tags)
            context["ec2:createaction"] = action
            self.checks.append(("CreateTags", arn(kind, "*", self.account, self.region), context, f"a new {kind}"))


def request_tag_context(tags):
    context = {f"aws:requesttag/{k}".lower(): v for k, v in tags.items()}
    if tags:
        context["aws:tagkeys"] = list(tags)
    return context


def request(action, params, account, region, resource_tags, attached_instance=lambda volume_id: None):
    """The authorizations `action` with query `params` needs."""
    r = Request(account, region, resource_tags)
    created = {
        "CreateVolume": ("volume", ["SnapshotId"]),
        "CreateSnapshot": ("snapshot", ["VolumeId"]),
        "CopySnapshot": ("snapshot", []),
        "CopyImage": ("image", []),
        "RegisterImage": ("image", []),
        "ImportKeyPair": ("key-pair", []),
    }
    if action in created:
        kind, sources = created[action]
        tags = _specified_tags(params, kind)
        r.context = request_tag_context(tags)
        r.new(kind, tags)
        r.tagging_on_create(action, kind, tags)
        for name in sources:
            for v in _values(params, name):
                r.existing(v)
        if action == "RegisterImage":
            for k, v in params.items():
                if re.fullmatch(r"BlockDeviceMapping\.\d+\.Ebs\.SnapshotId", k):
                    r.existing(_listed(v)[0])
        if action == "CopyImage":
            # The snapshots the copy makes are tagged by the same call.
            r.tagging_on_create(action, "snapshot", _specified_tags(params, "snapshot"))
    elif action == "RunInstances":
        tags = _specified_tags(params, "instance")
        r.context = request_tag_context(tags)
        r.new("instance", tags)
        r.tagging_on_create(action, "instance", tags)
        volume_tags = _specified_tags(params, "volume")
        r.new("volume", volume_tags)
        r.tagging_on_create(action, "volume", volume_tags)
        r.new("network-interface", {})
        for v in _values(params, "ImageId"):
            r.existing(v)
        for v in _values(params, "SubnetId"):
            r.existing(v)
        for v in _values(params, "SecurityGroupId"):
            r.existing(v)
        for v in _values(params, "KeyName"):
            r.existing(v, kind="key-pair")
    elif action in ("CreateTags", "DeleteTags"):
        tags = _tags_in(params, "Tag")
        extra = request_tag_context(tags) if action == "CreateTags" else {"aws:tagkeys": list(tags)}
        for v in _values(params, "ResourceId"):
            r.existing(v, extra=extra)
    elif action in ("AttachVolume", "DetachVolume"):
        volume = _one(params, "VolumeId")
        r.existing(volume)
        instance = _one(params, "InstanceId") or attached_instance(volume)
        if instance:
            r.existing(instance)
    else:
        names = {
            "DeleteSnapshot": ["SnapshotId"],
            "ModifySnapshotAttribute": ["SnapshotId"],
            "ModifyImageAttribute": ["ImageId"],
            "DeleteVolume": ["VolumeId"],
            "ModifyVolume": ["VolumeId"],
            "DeregisterImage": ["ImageId"],
            "EnableImageDeprecation": ["ImageId"],
            "DisableImageDeprecation": ["ImageId"],
            "EnableImageDeregistrationProtection": ["ImageId"],
            "DisableImageDeregistrationProtection": ["ImageId"],
            "DisableImage": ["ImageId"],
            "EnableImage": ["ImageId"],
            "StartInstances": ["InstanceId"],
            "StopInstances": ["InstanceId"],
            "TerminateInstances": ["InstanceId"],
        }.get(action)
        if names is None:
            # Reads and account-wide actions: authorized on "*".
            r.checks.append((None, "*", {}, "*"))
        for name in names or []:
            for v in _values(params, name):
                r.existing(v)
    return r


def refusal(policy, action, params, account, region, resource_tags, attached_instance=lambda v: None, user=""):
    """None when `policy` allows the call; else the UnauthorizedOperation
    message, naming the action and the first resource refused."""
    r = request(action, params, account, region, resource_tags, attached_instance)
    for as_action, resource_arn, context, _what in r.checks:
        name = f"{SERVICE}:{as_action or action}"
        verdict = decide(policy, name, resource_arn, context)
        if verdict != "allow":
            why = (
                "with an explicit deny in an identity-based policy"
                if verdict == "deny"
                else "because no identity-based policy allows the " + name + " action"
            )
            plain = f"User: {user} is not authorized to perform: {name} on resource: {resource_arn} {why}"
            encoded = base64.b64encode(json.dumps({"action": name, "resource": resource_arn}).encode()).decode()
            return (
                f"You are not authorized to perform this operation. {plain}. "
                f"Encoded authorization failure message: {encoded}"
            )
    return None
