# Parameters of data type aws:ec2:image: validated after PutParameter has
# answered. moto (5.1.22; 5.2.5 alike) accepts the data type and stores any
# value at once ("the check of the existence of an AMI ID ... is not
# supported").
#
# Systems Manager, as its API reference (PutParameter, DataType) and the
# Parameter Store guide ("Parameter data types", "Native parameter support
# for Amazon Machine Image IDs") describe it:
# - "If you call PutParameter with aws:ec2:image data type, a successful
#   HTTP 200 response does not guarantee that your parameter was
#   successfully created or updated. The aws:ec2:image value is validated
#   asynchronously": the value must be an AMI id (ami- and hex digits) and
#   "the specified AMI is available in your account" (its own, or one it
#   may launch).
# - A value that fails: "the parameter will not be created or updated".
# - A parameter cannot change to or from aws:ec2:image.
#
# The world: PutParameter answers its Version at once, and the new version
# waits aside, unseen by every call (GetParameter, GetParameters,
# GetParameterHistory, GetParametersByPath, DescribeParameters,
# LabelParameterVersion, ...), until its validation ends: a time drawn
# under LOCAL_WORLD_PACE=aws, none under instant. Then a valid version
# joins the parameter, and an invalid one is gone, as if never written.
# Validation judges the AMI as it is when it ends.

import re
import time

AMI_ID = re.compile(r"ami-[0-9a-f]{8}([0-9a-f]{9})?")


def _available(account_id, region, value):
    from moto.ec2.models import ec2_backends
    from world import shared_images

    if not AMI_ID.fullmatch(value or ""):
        return False
    try:
        ami = shared_images.find(ec2_backends[account_id][region], value)
    except Exception:
        return False
    return getattr(ami, "state", "available") == "available"


def _waiting(backend):
    """Versions under validation: name -> [(ends, Parameter)]."""
    if not hasattr(backend, "validating"):
        backend.validating = {}
    return backend.validating


def _settle(backend):
    """End every validation whose time has come."""
    now = time.monotonic()
    waiting = _waiting(backend)
    for name, pending in list(waiting.items()):
        for ends, p in list(pending):
            if now < ends:
                continue
            pending.remove((ends, p))
            if _available(backend.account_id, backend.region_name, p.value):
                versions = backend._parameters[name]
                versions.append(p)
                versions.sort(key=lambda v: v.version)
        if not pending:
            del waiting[name]


def install(pending_until):
    """`pending_until()`: when a validation the current call starts ends
    (None: at once)."""
    from moto.ssm import models as ssm_models
    from moto.ssm.exceptions import ValidationException

    backend_class = ssm_models.SimpleSystemManagerBackend
    put = backend_class.put_parameter

    def put_parameter(self, name, description, value, parameter_type, allowed_pattern, keyid, overwrite, tags,
                      data_type, tier=None, policies=None):
        _settle(self)
        had = name in self._parameters and bool(self._parameters[name])
        if had and data_type and (data_type == "aws:ec2:image") != (self._parameters[name][-1].data_type == "aws:ec2:image"):
            raise ValidationException(f"The data type of parameter {name} cannot change to or from aws:ec2:image.")
        param = put(self, name, description, value, parameter_type, allowed_pattern, keyid, overwrite, tags,
                    data_type, tier=tier, policies=policies)
        if param.data_type != "aws:ec2:image":
            return param
        # Aside until validated; versions go on counting past those aside.
        self._parameters[name].remove(param)
        if not self._parameters[name]:
            del self._parameters[name]
        pending = _waiting(self).setdefault(name, [])
        if pending:
            param.version = max(param.version, max(p.version for _, p in pending) + 1)
        pending.append((pending_until() or time.monotonic(), param))
        _settle(self)
        return param

    backend_class.put_parameter = put_parameter

    def settling(method):
        def wrapper(self, *args, **kwargs):
            _settle(self)
            return method(self, *args, **kwargs)

        return wrapper

    for method in (
        "get_parameter",
        "get_parameters",
        "get_parameter_history",
        "get_parameters_by_path",
        "describe_parameters",
        "label_parameter_version",
        "unlabel_parameter_version",
        "delete_parameter",
        "delete_parameters",
    ):
        if hasattr(backend_class, method):
            setattr(backend_class, method, settling(getattr(backend_class, method)))
