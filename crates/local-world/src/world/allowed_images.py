# Allowed AMIs: an account's own limit, per region, on which other
# accounts' AMIs it can see and launch. moto (5.1.22; 5.2.5 alike) has
# none of the four actions.
#
# EC2, as its API reference describes EnableAllowedImagesSettings,
# DisableAllowedImagesSettings, ReplaceImageCriteriaInAllowedImagesSettings,
# GetAllowedImagesSettings and the ImageCriterion type:
# - The state is `disabled` (the default), `enabled` or `audit-mode`, per
#   account and region. Enable answers AllowedImagesSettingsState, Disable
#   answers `disabled`, Replace answers `return: true`; Get answers State,
#   ImageCriteria and ManagedBy (`account` here: the world has no
#   declarative policies).
# - `enabled`: "only AMIs matching these criteria are discoverable and can
#   be used by your account to launch instances". The world hides the
#   others from DescribeImages and answers RunInstances (and CopyImage) on
#   them as on an AMI that does not exist, InvalidAMIID.NotFound: the API
#   reference names no error code of its own for it.
# - `audit-mode`: nothing is restricted, and DescribeImages shows each AMI
#   with ImageAllowed true or false.
# - "The Allowed AMIs feature does not restrict the AMIs owned by your
#   account": an account's own AMIs always pass.
# - An AMI is allowed when any criterion matches it; a criterion matches
#   when every field it sets does: ImageProviders (`amazon`: AMIs whose
#   owner alias is amazon; `aws-marketplace`, `aws-backup-vault`: none in
#   the world; `none`: the account's own only; else account ids),
#   MarketplaceProductCodes, ImageNames (with `*` and `?`),
#   CreationDateCondition.MaximumDaysSinceCreated and
#   DeprecationTimeCondition.MaximumDaysSinceDeprecated. The world's AMIs
#   carry no watermarks and no Inspector scans, so a criterion that sets
#   ImageWatermarks or ScanResultCondition matches none of them.

import re
from datetime import datetime, timezone

from moto.core.responses import ActionResult

STATES = ("enabled", "audit-mode")


def _settings(backend):
    if not hasattr(backend, "allowed_images"):
        backend.allowed_images = {"State": "disabled", "ImageCriteria": []}
    return backend.allowed_images


def _listed(v):
    if v is None:
        return []
    if isinstance(v, dict):
        return list(v.values())
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def _like(pattern, name):
    """EC2's ImageNames wildcards: `*` any run, `?` one character; every
    other character stands for itself."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


def _days_since(stamp):
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - when).total_seconds() / 86400


def _matches(criterion, ami, caller):
    providers = _listed(criterion.get("ImageProviders"))
    if providers:
        alias = getattr(ami, "owner_alias", None)
        if not any(
            p == ami.owner_id or (p == "amazon" and alias == "amazon") or (p == "none" and ami.owner_id == caller)
            for p in providers
        ):
            return False
    codes = _listed(criterion.get("MarketplaceProductCodes"))
    if codes and not set(codes) & set(getattr(ami, "product_codes", None) or ()):
        return False
    names = _listed(criterion.get("ImageNames"))
    if names and not any(_like(n, ami.name or "") for n in names):
        return False
    created = criterion.get("CreationDateCondition") or {}
    if created.get("MaximumDaysSinceCreated") is not None:
        age = _days_since(getattr(ami, "creation_date", None))
        if age is None or age > int(created["MaximumDaysSinceCreated"]):
            return False
    deprecated = criterion.get("DeprecationTimeCondition") or {}
    if deprecated.get("MaximumDaysSinceDeprecated") is not None:
        since = _days_since(getattr(ami, "deprecation_time", None))
        if since is not None and since > int(deprecated["MaximumDaysSinceDeprecated"]):
            return False
    if _listed(criterion.get("ImageWatermarks")) or criterion.get("ScanResultCondition"):
        return False
    return True


def allowed(backend, ami):
    """Whether the criteria of the caller (`backend`: its account and
    region) admit `ami`, whatever the state."""
    if ami.owner_id == backend.account_id:
        return True
    return any(_matches(c, ami, backend.account_id) for c in _settings(backend)["ImageCriteria"])


def hidden(backend, ami):
    """Whether the caller may neither see nor launch `ami`: Allowed AMIs is
    enabled and its criteria do not admit it."""
    return _settings(backend)["State"] == "enabled" and not allowed(backend, ami)


class Ami:
    """An AMI as one caller sees it in audit-mode: with ImageAllowed. Named
    like moto's class, so the serializer reads it the same way."""

    def __init__(self, ami, image_allowed):
        self._ami = ami
        self.image_allowed = image_allowed

    def __getattr__(self, name):
        return getattr(self._ami, name)


def _criterion(raw):
    out = {}
    for key in ("ImageProviders", "MarketplaceProductCodes", "ImageNames"):
        values = [v for v in _listed(raw.get(key)) if v]
        if values:
            out[key] = values
    for key, field in (
        ("CreationDateCondition", "MaximumDaysSinceCreated"),
        ("DeprecationTimeCondition", "MaximumDaysSinceDeprecated"),
    ):
        cond = raw.get(key) or {}
        if cond.get(field) is not None:
            out[key] = {field: int(cond[field])}
    if _listed(raw.get("ImageWatermarks")):
        out["ImageWatermarks"] = _listed(raw.get("ImageWatermarks"))
    if raw.get("ScanResultCondition"):
        out["ScanResultCondition"] = raw["ScanResultCondition"]
    return out


def install():
    from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError
    from moto.ec2.responses import amis as amis_responses

    def get_allowed_images_settings(self):
        self.error_on_dryrun()
        s = _settings(self.ec2_backend)
        return ActionResult({"State": s["State"], "ImageCriteria": s["ImageCriteria"], "ManagedBy": "account"})

    def enable_allowed_images_settings(self):
        self.error_on_dryrun()
        state = self._get_param("AllowedImagesSettingsState")
        if state not in STATES:
            raise EC2ClientError(
                "InvalidParameterValue",
                f"Value ({state}) for parameter AllowedImagesSettingsState is invalid: "
                "expected enabled or audit-mode.",
            )
        _settings(self.ec2_backend)["State"] = state
        return ActionResult({"AllowedImagesSettingsState": state})

    def disable_allowed_images_settings(self):
        self.error_on_dryrun()
        _settings(self.ec2_backend)["State"] = "disabled"
        return ActionResult({"AllowedImagesSettingsState": "disabled"})

    def replace_image_criteria_in_allowed_images_settings(self):
        self.error_on_dryrun()
        raw = _listed(self._get_param("ImageCriteria") or self._get_param("ImageCriterion"))
        criteria = [c for c in (_criterion(r) for r in raw) if c]
        if len(criteria) > 10:
            raise EC2ClientError("InvalidParameterValue", "ImageCriteria can hold at most 10 ImageCriterion.")
        _settings(self.ec2_backend)["ImageCriteria"] = criteria
        return ActionResult({"ReturnValue": True})

    r = amis_responses.AmisResponse
    r.get_allowed_images_settings = get_allowed_images_settings
    r.enable_allowed_images_settings = enable_allowed_images_settings
    r.disable_allowed_images_settings = disable_allowed_images_settings
    r.replace_image_criteria_in_allowed_images_settings = replace_image_criteria_in_allowed_images_settings

    # DescribeImages: enabled hides what the criteria leave out; audit-mode
    # says of each AMI whether they admit it.
    describe = r.describe_images

    def describe_images(self):
        result = describe(self)
        backend = self.ec2_backend
        state = _settings(backend)["State"]
        images = list(result.result.get("Images") or [])
        if state == "enabled":
            refused = [i.id for i in images if hidden(backend, i)]
            if refused and self._get_param("ImageIds", []):
                raise InvalidAMIIdError(refused[0])
            result.result["Images"] = [i for i in images if i.id not in refused]
        elif state == "audit-mode":
            result.result["Images"] = [Ami(i, allowed(backend, i)) for i in images]
        return result

    r.describe_images = describe_images

    # RunInstances and CopyImage find the caller's AMI through
    # shared_images.find: an AMI the criteria hide is not there.
    from world import shared_images

    find = shared_images.find

    def find_allowed(backend, ami_id, region=None):
        from moto.ec2.models import ec2_backends

        ami = find(backend, ami_id, region)
        if hidden(ec2_backends[backend.account_id][region or backend.region_name], ami):
            raise InvalidAMIIdError(ami_id)
        return ami

    shared_images.find = find_allowed
