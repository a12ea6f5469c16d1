# S3's conditional writes made atomic, as S3 makes them. moto (5.1.22; the
# 5.2 line reads the headers the same way) honours PutObject
# `If-None-Match: *` and `If-Match` (412 PreconditionFailed; 404 NoSuchKey
# for If-Match on a missing key) and DeleteObject `If-Match`, but checks
# and writes in two steps on a threaded server, with no lock between:
# two concurrent creates of one key can both succeed, which S3 never lets
# happen.
#
# S3, as its user guide ("How to prevent object overwrites with
# conditional writes", "Conditional requests") describes it: the condition
# is evaluated when the write completes, atomically; of concurrent
# conditional writes to one key the first to complete wins and the others
# get 412 (or 409 ConditionalRequestConflict when they overlap with a
# conflicting operation, to be retried). The reads and lists after a
# write see it (strong read-after-write consistency, since December 2020),
# which moto's in-memory keys already give.
#
# The world: every key write and delete (PUT, DELETE, and POST for
# multipart completion) runs under one lock, so a condition and the write
# it guards happen as one step. Reads are not locked.

import threading

from moto.s3.responses import S3Response

_WRITES = threading.Lock()


def install():
    for name in ("_key_response_put", "_key_response_delete", "_key_response_post"):
        original = getattr(S3Response, name)

        def locked(self, *args, _original=original, **kwargs):
            with _WRITES:
                return _original(self, *args, **kwargs)

        setattr(S3Response, name, locked)
