# Tag changes seen late (LOCAL_WORLD_FAULTS lag=D), which moto never does
# (5.1.22 and 5.2.5 alike: a tag is in every answer from the moment
# CreateTags returns).
#
# EC2's API is eventually consistent: "the result of an API command you run
# that affects your Amazon EC2 resources might not be immediately visible to
# all subsequent commands you run" (EC2 developer guide, "Eventual
# consistency in the Amazon EC2 API"). Tags are no exception: a tag that
# CreateTags set, changed or DeleteTags removed may still be answered as it
# was by DescribeTags, by `tag:KEY`, `tag-key` and `tag-value` filters, and
# in the TagSet of Describe* answers.
#
# Each resource a tool's CreateTags or DeleteTags names has its change seen
# after a time drawn from the seed in 0..D (D of the `lag` fault, the
# window in which new ids are unknown): until then every modelled call sees
# the tags it had before. Tags given at creation (TagSpecifications) come
# with the resource itself, whose own lag already hides it. The world's own
# calls always see the truth.
#
# A deleted resource's tags go with it (DeleteSnapshot, DeleteVolume,
# DeregisterImage), which moto does not do (5.1.22 and 5.2.5 keep them in
# DescribeTags for good, naming ids that no longer exist). EC2 drops them,
# eventually like any tag change: for a tool's delete, DescribeTags and the
# filters may still list them for a time drawn the same way (then naming an
# id whose describe answers NotFound). Terminated instances keep their tags
# while EC2 still lists them (about an hour), as in moto.
#
# Each change seen late adds a line to $LOCAL_WORLD_DIR/tag-lag.log
# ("resource key seconds"), for the world's summary of what struck.

import os
import threading
import time
import types

from moto.ec2.models.amis import AmiBackend
from moto.ec2.models.elastic_block_store import EBSBackend
from moto.ec2.models.tags import TagBackend

_LOCK = threading.Lock()
# (resource id, key) -> (monotonic time the change is seen, value before it
# or None when the key was absent).
_PENDING = {}


def install(modelled, serving, model, call_key):
    """Wrap moto's tag store. `modelled()`: whether the call being served is
    a tool's; `serving(action)`: whether it is that action itself;
    `call_key()`: the call's key for the seed's draws."""
    create = TagBackend.create_tags
    delete = TagBackend.delete_tags
    describe = TagBackend.describe_tags

    def changing(self, resource_ids, tags, apply, always=False):
        if not (modelled() and (always or serving("CreateTags") or serving("DeleteTags"))):
            return apply()
        before = {rid: dict(self.tags.get(rid, {})) for rid in resource_ids}
        result = apply()
        now = time.monotonic()
        key = call_key()
        for i, rid in enumerate(resource_ids):
            seconds = model.lag(f"{key}/tags/{i}")
            if seconds <= 0:
                continue
            for tag in tags:
                old, new = before[rid].get(tag), self.tags.get(rid, {}).get(tag)
                if old == new:
                    continue
                with _LOCK:
                    pending = _PENDING.get((rid, tag))
                    if pending is not None and pending[0] > now:
                        # An earlier change not yet seen: what is seen stays
                        # what was before it, for the longer of the two.
                        _PENDING[(rid, tag)] = (max(pending[0], now + seconds), pending[1])
                    else:
                        _PENDING[(rid, tag)] = (now + seconds, old)
                _note(rid, tag, seconds)
        return result

    def create_tags(self, resource_ids, tags):
        return changing(self, resource_ids, tags, lambda: create(self, resource_ids, tags))

    def delete_tags(self, resource_ids, tags):
        return changing(self, resource_ids, tags, lambda: delete(self, resource_ids, tags))

    def describe_tags(self, filters=None):
        results = describe(self, filters)
        if not modelled() or not _PENDING:
            return results
        now = time.monotonic()
        with _LOCK:
            for k in [k for k, (until, _) in _PENDING.items() if until <= now]:
                del _PENDING[k]
            hidden = {k: old for k, (until, old) in _PENDING.items()}
        if not hidden:
            return results
        out = [r for r in results if (r["resource_id"], r["key"]) not in hidden]
        for (rid, tag), old in hidden.items():
            if old is None:
                continue
            # The value before the change, if it matches the filters.
            one = types.SimpleNamespace(tags={rid: {tag: old}}, VALID_TAG_FILTERS=TagBackend.VALID_TAG_FILTERS)
            out.extend(describe(one, filters))
        return out

    TagBackend.create_tags = create_tags
    TagBackend.delete_tags = delete_tags
    TagBackend.describe_tags = describe_tags

    def forgetting(method):
        def deleting(self, resource_id, *args, **kwargs):
            result = method(self, resource_id, *args, **kwargs)
            tags = dict(self.tags.get(resource_id, {}))
            if tags:
                remove = lambda: self.tags.pop(resource_id, None)  # noqa: E731
                if modelled():
                    changing(self, [resource_id], tags, remove, always=True)
                else:
                    remove()
            return result

        return deleting

    EBSBackend.delete_snapshot = forgetting(EBSBackend.delete_snapshot)
    EBSBackend.delete_volume = forgetting(EBSBackend.delete_volume)
    AmiBackend.deregister_image = forgetting(AmiBackend.deregister_image)


def _note(resource_id, key, seconds):
    world = os.environ.get("LOCAL_WORLD_DIR")
    if world:
        with _LOCK, open(os.path.join(world, "tag-lag.log"), "a") as log:
            log.write(f"{resource_id} {key} {seconds:.1f}\n")
