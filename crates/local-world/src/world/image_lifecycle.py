# An AMI's life after it is made: deprecation, deregistration protection,
# disabling, its last launch, and what references it. moto (5.1.22; 5.2.5
# alike) has none of EnableImageDeprecation, DisableImageDeprecation,
# EnableImageDeregistrationProtection, DisableImageDeregistrationProtection,
# DisableImage, EnableImage or DescribeImageReferences, and no
# LastLaunchedTime.
#
# EC2, as its API reference (those actions, DescribeImages, the Image and
# ImageReference types) and the user guide ("Deprecate an AMI", "Protect an
# AMI from deregistration", "Disable an AMI", "Identify your resources
# referencing specified AMIs") describe it:
# - EnableImageDeprecation(ImageId, DeprecateAt): seconds are rounded to
#   the nearest minute; a time in the past, or more than 10 years ahead, is
#   refused (the world answers InvalidParameterValue: no code is named).
#   DescribeImages then shows DeprecationTime; DisableImageDeprecation
#   removes it. Both answer Return true. An AMI whose DeprecationTime has
#   passed is left out of DescribeImages for other accounts unless they
#   name its id or give IncludeDeprecated; its owner always sees it.
# - EnableImageDeregistrationProtection(ImageId, WithCooldown) answers
#   Return "enabled-without-cooldown" or "enabled-with-cooldown", which
#   DescribeImages shows as DeregistrationProtection ("disabled" when off).
#   DisableImageDeregistrationProtection answers "disabled"; with the
#   cooldown the AMI stays protected for 24 hours more, shown as
#   "disabled after TIME" (the form other tools read; AWS documents none).
#   DeregisterImage of a protected AMI is refused whatever IAM allows; no
#   error code is documented: the world answers OperationNotPermitted, as
#   EC2 does for an instance with termination protection.
# - DisableImage: the AMI's state becomes `disabled`, every launch
#   permission is removed, DescribeImages leaves it out unless
#   IncludeDisabled is given, and it cannot be launched (the world:
#   InvalidAMIID.Unavailable, as for a deregistered AMI: no code is named)
#   or copied. EnableImage makes it `available`; permissions stay removed.
#   Both answer Return true; only the owner may call them.
# - LastLaunchedTime (DescribeImages, and DescribeImageAttribute
#   lastLaunchedTime): when an instance was last launched from the AMI.
#   EC2 may report a launch up to 24 hours late; the world reports it at
#   once (kinder: a tool may not take its absence as "never launched
#   lately", which the product does not).
# - DescribeImageReferences(ImageIds: 1..10, IncludeAllResourceTypes or
#   ResourceTypes): ImageReferences of ImageId, ResourceType and Arn for
#   ec2:Instance (every state unless the state-name option narrows it),
#   ec2:LaunchTemplate (its 10 newest versions unless version-depth says
#   otherwise) and ssm:Parameter (the world: a parameter whose current
#   value is the AMI id; which data types AWS counts is not documented).
#   Image Builder recipes are not modelled.

import time
from datetime import datetime, timedelta, timezone

from moto.core.responses import ActionResult

COOLDOWN = 24 * 3600
MAX_AHEAD = timedelta(days=3653)


def _stamp(when):
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _parse(value):
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value)
    try:
        return datetime.fromtimestamp(float(text), timezone.utc)
    except ValueError:
        pass
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def protection(ami):
    """What DescribeImages shows as DeregistrationProtection."""
    state = getattr(ami, "protection_state", "disabled")
    until = getattr(ami, "protected_until", None)
    if state == "disabled" and until is not None:
        if time.time() < until:
            return "disabled after " + _stamp(datetime.fromtimestamp(until, timezone.utc))
        ami.protected_until = None
    return state


def protected(ami):
    return protection(ami) != "disabled"


def deprecated(ami):
    when = getattr(ami, "deprecation_time", None)
    return when is not None and _parse(when) <= datetime.now(timezone.utc)


def install():
    from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError, UnvailableAMIIdError
    from moto.ec2.models.amis import Ami, AmiBackend
    from moto.ec2.responses import amis as amis_responses
    from world import shared_images

    # DeregistrationProtection shows through a property.
    Ami.deregistration_protection = property(protection)

    def own(self, ami_id):
        ami = self.ec2_backend.amis.get(ami_id)
        if ami is None or ami.owner_id != self.ec2_backend.account_id:
            raise InvalidAMIIdError(ami_id)
        return ami

    r = amis_responses.AmisResponse

    def enable_image_deprecation(self):
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        when = _parse(self._get_param("DeprecateAt"))
        # Seconds round to the nearest minute.
        when = (when + timedelta(seconds=30)).replace(second=0, microsecond=0)
        now = datetime.now(timezone.utc)
        if when < now.replace(second=0, microsecond=0):
            raise EC2ClientError("InvalidParameterValue", f"DeprecateAt {_stamp(when)} is in the past.")
        if when > now + MAX_AHEAD:
            raise EC2ClientError("InvalidParameterValue", "DeprecateAt can be at most 10 years from now.")
        ami.deprecation_time = _stamp(when)
        return ActionResult({"Return": True})

    def disable_image_deprecation(self):
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        ami.deprecation_time = None
        return ActionResult({"Return": True})

    def enable_image_deregistration_protection(self):
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        cooldown = str(self._get_param("WithCooldown", False)).lower() == "true"
        ami.protection_state = "enabled-with-cooldown" if cooldown else "enabled-without-cooldown"
        ami.protected_until = None
        return ActionResult({"Return": ami.protection_state})

    def disable_image_deregistration_protection(self):
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        if getattr(ami, "protection_state", "disabled") == "enabled-with-cooldown":
            ami.protected_until = time.time() + COOLDOWN
        ami.protection_state = "disabled"
        return ActionResult({"Return": "disabled"})

    def disable_image(self):
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        ami.launch_permissions = []
        ami.state = "disabled"
        return ActionResult({"Return": True})

    def enable_image(self):
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        if ami.state == "disabled":
            ami.state = "available"
        return ActionResult({"Return": True})

    def describe_image_references(self):
        self.error_on_dryrun()
        backend = self.ec2_backend
        ids = self._get_param("ImageIds", []) or []
        if not 1 <= len(ids) <= 10:
            raise EC2ClientError("InvalidParameterValue", "ImageIds takes 1 to 10 AMI ids.")
        everything = str(self._get_param("IncludeAllResourceTypes", False)).lower() == "true"
        asked = {}
        for t in self._get_param("ResourceTypes", []) or []:
            options = {o.get("OptionName"): o.get("OptionValues") or [] for o in (t.get("ResourceTypeOptions") or [])}
            asked[t.get("ResourceType")] = options
        if not everything and not asked:
            raise EC2ClientError("InvalidParameterCombination", "Give IncludeAllResourceTypes or ResourceTypes.")

        def wanted(kind):
            return everything or kind in asked

        refs = []
        if wanted("ec2:Instance"):
            states = (asked.get("ec2:Instance") or {}).get("state-name") or []
            for reservation in backend.reservations.values():
                for i in reservation.instances:
                    if i.image_id in ids and (not states or i._state.name in states):
                        arn = f"arn:aws:ec2:{backend.region_name}:{backend.account_id}:instance/{i.id}"
                        refs.append({"ImageId": i.image_id, "ResourceType": "ec2:Instance", "Arn": arn})
        if wanted("ec2:LaunchTemplate"):
            depth = (asked.get("ec2:LaunchTemplate") or {}).get("version-depth") or ["10"]
            depth = int(depth[0])
            for lt in backend.launch_templates.values():
                for v in list(lt.versions)[-depth:]:
                    image = (getattr(v, "data", None) or {}).get("ImageId")
                    if image in ids:
                        arn = f"arn:aws:ec2:{backend.region_name}:{backend.account_id}:launch-template/{lt.id}"
                        refs.append({"ImageId": image, "ResourceType": "ec2:LaunchTemplate", "Arn": arn})
                        break
        if wanted("ssm:Parameter"):
            from moto.ssm.models import ssm_backends

            ssm = ssm_backends[backend.account_id][backend.region_name]
            for name in list(ssm._parameters.keys()):
                versions = ssm._parameters[name]
                if versions and versions[-1].value in ids:
                    arn = f"arn:aws:ssm:{backend.region_name}:{backend.account_id}:parameter{name if name.startswith('/') else '/' + name}"
                    refs.append({"ImageId": versions[-1].value, "ResourceType": "ssm:Parameter", "Arn": arn})
        return ActionResult({"ImageReferences": refs})

    for name, fn in list(locals().items()):
        if name in (
            "enable_image_deprecation",
            "disable_image_deprecation",
            "enable_image_deregistration_protection",
            "disable_image_deregistration_protection",
            "disable_image",
            "enable_image",
            "describe_image_references",
        ):
            setattr(r, name, fn)

    # DescribeImages: deprecated AMIs of other accounts, and disabled ones,
    # only when asked for.
    describe = r.describe_images

    def describe_images(self):
        result = describe(self)
        backend = self.ec2_backend
        named = bool(self._get_param("ImageIds", []))
        with_deprecated = str(self._get_param("IncludeDeprecated", False)).lower() == "true"
        with_disabled = str(self._get_param("IncludeDisabled", False)).lower() == "true"
        kept = []
        for i in result.result.get("Images") or []:
            if i.state == "disabled" and not with_disabled:
                continue
            if deprecated(i) and i.owner_id != backend.account_id and not (named or with_deprecated):
                continue
            kept.append(i)
        result.result["Images"] = kept
        return result

    r.describe_images = describe_images

    # DescribeImageAttribute lastLaunchedTime.
    describe_attribute = r.describe_image_attribute

    def describe_image_attribute(self):
        if self._get_param("Attribute") != "lastLaunchedTime":
            return describe_attribute(self)
        ami = own(self, self._get_param("ImageId"))
        self.error_on_dryrun()
        out = {"ImageId": ami.id}
        if getattr(ami, "last_launched_time", None):
            out["LastLaunchedTime"] = {"Value": ami.last_launched_time}
        return ActionResult(out)

    r.describe_image_attribute = describe_image_attribute

    # DeregisterImage: never while protected.
    deregister = AmiBackend.deregister_image

    def deregister_image(self, ami_id):
        ami = self.amis.get(ami_id)
        if ami is not None and protected(ami):
            raise EC2ClientError(
                "OperationNotPermitted",
                f"The image '{ami_id}' is protected from deregistration ({protection(ami)}); "
                "disable its deregistration protection and try again.",
            )
        return deregister(self, ami_id)

    AmiBackend.deregister_image = deregister_image

    # Launching (and copying) finds the AMI through shared_images.find: a
    # disabled one is not available; a launch records its time.
    find = shared_images.find

    def find_enabled(backend, ami_id, region=None):
        ami = find(backend, ami_id, region)
        if ami.state == "disabled":
            raise UnvailableAMIIdError(ami_id)
        return ami

    shared_images.find = find_enabled

    from moto.ec2.models.instances import InstanceBackend

    run = InstanceBackend.run_instances

    def run_instances(self, image_id, *args, **kwargs):
        result = run(self, image_id, *args, **kwargs)
        from moto.ec2.models import ec2_backends

        for account in list(ec2_backends.keys()):
            regions = ec2_backends[account]
            if self.region_name in regions.keys():
                ami = regions[self.region_name].amis.get(image_id)
                if ami is not None:
                    ami.last_launched_time = _stamp(datetime.now(timezone.utc)).replace(".000Z", "Z")
        return result

    InstanceBackend.run_instances = run_instances
