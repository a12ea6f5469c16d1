# The world's AWS Organization needs accounts whose ids it chooses (the
# accounts its profiles and roles already name); moto's CreateAccount draws
# a random id. The world's own CreateAccount asks for an id through the
# e-mail address, ID@accounts.local-world.invalid (a reserved domain no
# real address uses); any other address gets moto's random id. Everything
# else about the organization is moto's: ListAccounts,
# ListAccountsForParent, ListOrganizationalUnitsForParent, ListRoots,
# MoveAccount, CloseAccount (the account becomes SUSPENDED) and
# RemoveAccountFromOrganization, as the Organizations API reference
# describes them.

import re

_CHOSEN = re.compile(r"^(\d{12})@accounts\.local-world\.invalid$")


def install():
    from moto.organizations import models

    original_init = models.FakeAccount.__init__

    def __init__(self, organization, **kwargs):
        original_init(self, organization, **kwargs)
        chosen = _CHOSEN.match(kwargs.get("Email", ""))
        if chosen:
            self.id = chosen.group(1)

    models.FakeAccount.__init__ = __init__
    install_listing_rights()


# Who may list the organization: "This operation can be called only from
# the organization's management account or by a member account that is a
# delegated administrator" (Organizations API reference, ListAccounts,
# ListAccountsForParent, ListOrganizationalUnitsForParent, ListRoots,
# ListChildren); any other caller gets AccessDeniedException. moto answered
# a member account from an empty organization of its own, and a delegated
# administrator the same way.
_LISTINGS = (
    "list_accounts",
    "list_accounts_for_parent",
    "list_organizational_units_for_parent",
    "list_roots",
    "list_children",
)


def _listing_backend(response):
    """The backend that answers the caller's listing: its own organization
    (management account), or the one it is a delegated administrator of."""
    from moto.core.exceptions import JsonRESTError
    from moto.organizations.models import organizations_backends

    caller = response.current_account
    own = organizations_backends[caller][response.partition]
    if own.org is not None:
        return own
    management = organizations_backends.master_accounts.get(caller)
    if management:
        backend = organizations_backends[management[0]][management[1]]
        if any(a.account.id == caller for a in backend.admins):
            return backend
    raise JsonRESTError("AccessDeniedException", "You don't have permissions to access this resource.")


def install_listing_rights():
    from moto.organizations import responses

    for name in _LISTINGS:
        original = getattr(responses.OrganizationsResponse, name)

        def listing(self, _original=original):
            backend = _listing_backend(self)
            cls = type(self)
            saved = cls.organizations_backend
            # Answer from that backend for this one call (the launcher
            # serves one request at a time, under its lock).
            try:
                cls.organizations_backend = property(lambda _self: backend)
                return _original(self)
            finally:
                cls.organizations_backend = saved

        setattr(responses.OrganizationsResponse, name, listing)
