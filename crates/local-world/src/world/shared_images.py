# AMIs shared with other accounts: what the accounts an AMI is shared with
# can see and do with it. moto (5.1.22; 5.2.5 alike) keeps an AMI's launch
# permissions but never lets another account use them: each account's
# DescribeImages shows only its own AMIs and the public ones, RunInstances
# launches any id at all (even one that does not exist), and CopyImage only
# looks in the caller's own account.
#
# EC2, as its documentation describes it:
# - DescribeImages (EC2 API reference): "The images available to you include
#   public images, private images that you own, and private images owned by
#   other Amazon Web Services accounts for which you have explicit launch
#   permissions." Owners=ACCOUNT narrows to that owner's; ExecutableUsers=self
#   to those the caller holds an explicit launch permission for; ImageIds
#   names images the caller may launch, else InvalidAMIID.NotFound.
#   ExecutableUsers "scopes the images by users with explicit launch
#   permissions" ("all" for public AMIs); moto added every public image
#   to any ExecutableUsers.
# - Launch permissions (User Guide, "Share an AMI with specific
#   organizations or OUs"): a permission for an organization or OU ARN lets
#   every account in it (OUs: also in the OUs below it) launch the AMI.
# - RunInstances of an AMI the caller may not launch (or that does not
#   exist) answers InvalidAMIID.NotFound.
# - CopyImage of an AMI shared with the caller is allowed ("Copy an AMI":
#   "you can copy an AMI that another account has shared with you"), and
#   needs read access to its snapshots (createVolumePermission), which the
#   world's CopyImage checks before it makes anything (moto_launch.py).
# - ModifySnapshotAttribute takes the accounts either as UserIds with an
#   OperationType or as CreateVolumePermission.Add/Remove lists of UserId
#   and Group (EC2 API reference); moto reads only the first form.
# - Only the owner may change an AMI's attributes; moto only ever finds an
#   account's own AMIs there, so that holds already.

from moto.ec2.exceptions import InvalidAMIIdError
from moto.ec2.responses import amis as amis_responses


def _organizations():
    """Every organization the world holds: (backend, organization)."""
    from moto.organizations.models import organizations_backends

    out = []
    for account in list(organizations_backends.keys()):
        for backend in organizations_backends[account].values():
            if getattr(backend, "org", None) is not None:
                out.append(backend)
    return out


def _member_of(account_id, permission):
    """Whether an organization or OU launch permission covers `account_id`:
    an ACTIVE account of that organization, or one whose parent chain
    reaches that OU."""
    org_arn = permission.get("OrganizationArn")
    ou_arn = permission.get("OrganizationalUnitArn")
    if not org_arn and not ou_arn:
        return False
    for backend in _organizations():
        member = next((a for a in backend.accounts if a.id == account_id and a.status == "ACTIVE"), None)
        if member is None:
            continue
        if org_arn:
            if backend.org.arn == org_arn:
                return True
            continue
        by_id = {ou.id: ou for ou in backend.ou}
        parent = member.parent_id
        seen = set()
        while parent and parent not in seen:
            seen.add(parent)
            ou = by_id.get(parent)
            if ou is None:
                break
            if getattr(ou, "arn", None) == ou_arn:
                return True
            parent = getattr(ou, "parent_id", None)
    return False


def launchable_by(ami, account_id):
    """Whether `account_id` may launch `ami` (another account's)."""
    for p in ami.launch_permissions:
        if p.get("Group") == "all" or p.get("UserId") == account_id or _member_of(account_id, p):
            return True
    return False


def explicitly_for(ami, account_id):
    return any(p.get("UserId") == account_id for p in ami.launch_permissions)


def shared_with(backend):
    """Other accounts' AMIs in the caller's region that it may launch."""
    from moto.ec2.models import ec2_backends

    region = backend.region_name
    out = []
    for account in list(ec2_backends.keys()):
        if account == backend.account_id:
            continue
        regions = ec2_backends[account]
        if region not in regions.keys():
            continue
        for ami in list(regions[region].amis.values()):
            if ami.owner_id != backend.account_id and launchable_by(ami, backend.account_id) and not ami.is_public:
                out.append(ami)
    return out


def find(backend, ami_id, region=None):
    """The AMI `ami_id` as the caller may use it: its own, or one shared
    with it; else InvalidAMIID.NotFound."""
    from moto.ec2.models import ec2_backends

    own = ec2_backends[backend.account_id][region or backend.region_name]
    if ami_id in own.amis:
        return own.amis[ami_id]
    for ami in shared_with(own):
        if ami.id == ami_id:
            return ami
    raise InvalidAMIIdError(ami_id)


def _modify_snapshot_attribute(original):
    def modify_snapshot_attribute(self):
        changes = self._get_param("CreateVolumePermission", {}) or {}
        if not changes:
            return original(self)
        self.error_on_dryrun()
        snapshot_id = self._get_param("SnapshotId")
        for key, apply in (
            ("Add", self.ec2_backend.add_create_volume_permission),
            ("Remove", self.ec2_backend.remove_create_volume_permission),
        ):
            items = changes.get(key) or []
            if isinstance(items, dict):
                items = list(items.values())
            users = [i["UserId"] for i in items if i.get("UserId")]
            groups = [i["Group"] for i in items if i.get("Group")]
            if users or groups:
                apply(snapshot_id, user_ids=users, groups=groups)
        from moto.core.responses import EmptyResult

        return EmptyResult()

    return modify_snapshot_attribute


def install():
    from moto.ec2.models.amis import AmiBackend
    from moto.ec2.models.instances import InstanceBackend
    from moto.ec2.utils import generic_filter

    original_describe = amis_responses.AmisResponse.describe_images

    def describe_images(self):
        backend = self.ec2_backend
        foreign = shared_with(backend)
        ami_ids = self._get_param("ImageIds", [])
        if ami_ids:
            extra = [a for a in foreign if a.id in ami_ids]
            if extra and len(extra) == len(ami_ids):
                self.error_on_dryrun()
                from moto.core.responses import ActionResult

                return ActionResult({"Images": extra})
            result = original_describe(self)
            result.result["Images"] = list(result.result["Images"]) + extra
            return result
        result = original_describe(self)
        owners = self._get_param("Owners", [])
        exec_users = self._get_param("ExecutableUsers", [])
        if owners:
            foreign = [a for a in foreign if a.owner_id in owners]
        if exec_users:
            wanted = {backend.account_id if u == "self" else u for u in exec_users}
            foreign = [a for a in foreign if any(explicitly_for(a, u) for u in wanted)]
            if "all" not in exec_users:
                # moto adds every public image; EC2 only when asked for "all".
                result.result["Images"] = [
                    i for i in result.result["Images"] if not (i.is_public and i.owner_id != backend.account_id)
                ]
        filters = self._filters_from_querystring()
        if filters:
            foreign = generic_filter(filters, foreign)
        result.result["Images"] = list(result.result["Images"]) + foreign
        return result

    amis_responses.AmisResponse.describe_images = describe_images

    from moto.ec2.responses import elastic_block_store as ebs_responses

    ebs_responses.ElasticBlockStore.modify_snapshot_attribute = _modify_snapshot_attribute(
        ebs_responses.ElasticBlockStore.modify_snapshot_attribute
    )

    # RunInstances: only an AMI the caller owns or may launch.
    original_run = InstanceBackend.run_instances

    def run_instances(self, image_id, *args, **kwargs):
        find(self, image_id)
        return original_run(self, image_id, *args, **kwargs)

    InstanceBackend.run_instances = run_instances

    # CopyImage: also of an AMI shared with the caller.
    def copy_image(self, source_image_id, source_region, name=None, description=None):
        from moto.ec2.models.amis import Ami, random_ami_id

        source_ami = find(self, source_image_id, source_region)
        ami_id = random_ami_id()
        ami = Ami(self, ami_id, instance=None, source_ami=source_ami, name=name, description=description)
        # The copy is the caller's, private, whoever owned the source.
        ami.owner_id = self.account_id
        ami.launch_permissions = []
        self.amis[ami_id] = ami
        return ami

    AmiBackend.copy_image = copy_image
