# Snapshots and AMIs that end failed instead of ready (LOCAL_WORLD_FAULTS
# fail=P), which moto never does (5.1.22 and 5.2.5 alike):
#
# - A snapshot can end in state `error` instead of `completed` ("Snapshot
#   states": pending, completed, error, recoverable, recovering; EC2 API
#   reference, `Snapshot`). The EBS user guide tells to delete such a
#   snapshot and take it again.
# - An AMI can end in state `failed` instead of `available` (EC2 API
#   reference, `Image`: "failed" among the image states, with a
#   StateReason). A failed AMI keeps its name until it is deregistered.
#
# A share P of the snapshots (CreateSnapshot, CopySnapshot and the copies
# CopyImage makes) and AMIs (RegisterImage, CopyImage) that a tool's calls
# make is decided, from the seed, to fail: each passes through its pending
# time as usual and then shows the failed state for good. The world's own
# calls never fail.

import os
import threading

# Attribute set on a resource decided to fail.
MARK = "world_fails"

_LOCK = threading.Lock()
# "account/region/action/kind" -> resources of the kind its calls made.
_MADE = {}


# The actions whose resources can fail, by kind of resource: moto makes
# snapshots of its own inside other actions (RegisterImage), which EC2
# does not.
FAILING = {
    "snapshot": frozenset({"CreateSnapshot", "CopySnapshot", "CopyImage"}),
    "image": frozenset({"RegisterImage", "CopyImage", "CreateImage"}),
}


def mark(resource, kind, model, call_key):
    """Decide, from the seed, whether a `kind` resource ("snapshot",
    "image") the call `call_key` ("account/region/action/n") makes fails.
    The decision is keyed by the resource's place among those of its kind
    the action made in its account and region, not by the call's: calls
    refused before making anything (a snapshot rate, a bucket) do not shift
    it, so a replay meets the same failures."""
    action_key = call_key.rsplit("/", 1)[0]
    if action_key.split("/")[2] not in FAILING[kind]:
        return
    counter = f"{action_key}/{kind}"
    with _LOCK:
        n = _MADE.get(counter, 0)
        _MADE[counter] = n + 1
    if model.chance("fail", f"{counter}{n}"):
        resource.__dict__[MARK] = True
        # One line per resource decided to fail, for the world's summary.
        world = os.environ.get("LOCAL_WORLD_DIR")
        if world:
            with _LOCK, open(os.path.join(world, "failed.log"), "a") as log:
                log.write(f"{kind} {resource.id} {action_key}\n")


def install(snapshot_cls, ami_cls):
    """Wrap the state properties the launcher gives snapshots and AMIs:
    once past pending, a marked one shows its failed state."""
    status = snapshot_cls.status

    def snapshot_status(self):
        shown = status.fget(self)
        if shown == "completed" and self.__dict__.get(MARK):
            self.__dict__["state_message"] = "The snapshot could not be completed (local world: fail)."
            return "error"
        return shown

    snapshot_cls.status = property(snapshot_status, status.fset)
    state = ami_cls.state

    def ami_state(self):
        shown = state.fget(self)
        if shown == "available" and self.__dict__.get(MARK):
            self.__dict__["state_reason"] = {
                "Code": "Client.InternalError",
                "Message": "The image could not be made (local world: fail).",
            }
            return "failed"
        return shown

    ami_cls.state = property(ami_state, state.fset)
