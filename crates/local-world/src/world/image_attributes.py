# The attributes RegisterImage takes, kept and described as EC2 does; moto
# (5.1.22) drops them: a registered AMI describes no EnaSupport, TpmSupport
# or ImdsSupport, and DescribeImageAttribute of tpmSupport, uefiData,
# imdsSupport, lastLaunchedTime or ramdisk answers an HTML 500 (moto looks
# for attributes its AMI model does not have).
#
# EC2 API reference, RegisterImage: EnaSupport (boolean), SriovNetSupport
# ("simple"), TpmSupport ("v2.0"), UefiData (base64 of the variable store),
# ImdsSupport ("v2.0"), BootMode, as request parameters; DescribeImages'
# Image shows EnaSupport, SriovNetSupport, TpmSupport, ImdsSupport and
# BootMode; DescribeImageAttribute answers each attribute as {Value: ...}
# (empty when not set). CopyImage: "the new AMI has the same attributes as
# the source" (EC2 User Guide, "Copy an AMI": launch permissions, tags and
# S3 bucket permissions are not copied; the rest is).

# RegisterImage parameter -> the AMI attribute DescribeImages shows (moto's
# serializer reads the snake_case name) and the one its
# DescribeImageAttribute reads.
PARAMETERS = {
    "EnaSupport": ("ena_support", None),
    "SriovNetSupport": ("sriov_net_support", "sriov"),
    "TpmSupport": ("tpm_support", "tmp"),
    "UefiData": ("uefi_data", "uefi"),
    "ImdsSupport": ("imds_support", "imds"),
}
# What DescribeImageAttribute reads that an AMI may never have been given.
_UNSET = ("tmp", "uefi", "imds", "lld", "ramdisk")


def _value(name, raw):
    if name == "EnaSupport":
        return str(raw).lower() == "true"
    return raw


def keep(ami, get_param):
    """Set on `ami` every attribute the RegisterImage request gave."""
    for attr in _UNSET:
        if not hasattr(ami, attr):
            setattr(ami, attr, None)
    for param, (shown, read) in PARAMETERS.items():
        raw = get_param(param)
        if raw is None:
            continue
        value = _value(param, raw)
        setattr(ami, shown, value)
        if read:
            setattr(ami, read, value)


def copy(source, ami):
    """A copy's attributes are its source's."""
    for attr in _UNSET:
        setattr(ami, attr, getattr(source, attr, None) if source is not None else None)
    if source is None:
        return
    for shown, read in PARAMETERS.values():
        if hasattr(source, shown):
            setattr(ami, shown, getattr(source, shown))
        if read and hasattr(source, read):
            setattr(ami, read, getattr(source, read))


def install(ami_backend_cls):
    """DescribeImageAttribute of an attribute an AMI was never given answers
    it empty, as EC2 does, instead of failing."""
    from moto.ec2.exceptions import InvalidAMIIdError

    def describe_image_attribute(self, ami_id, attribute_name):
        if ami_id not in self.amis:
            raise InvalidAMIIdError(ami_id)
        return getattr(self.amis[ami_id], attribute_name, None)

    ami_backend_cls.describe_image_attribute = describe_image_attribute
