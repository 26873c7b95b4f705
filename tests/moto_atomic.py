"""moto's S3 server with conditional writes made atomic, as S3's are.

moto checks ``If-None-Match: *`` and then stores the object, in two steps that
concurrent requests interleave: eight threads racing to create one lock object
were all told they had won, now and then.  Every object-writing request is
served one at a time here, so the tests exercise S3's semantics, not moto's
race.  Run as ``python moto_atomic.py -H HOST -p PORT``.
"""
import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_writing = threading.Lock()


def _one_at_a_time(method):
    def serve(self, *args, **kwargs):
        with _writing:
            return method(self, *args, **kwargs)

    return serve


S3Response.put_object = _one_at_a_time(S3Response.put_object)  # PUT object: check, then store
S3Response._key_response_post = _one_at_a_time(S3Response._key_response_post)  # multipart completion likewise

if __name__ == "__main__":
    main(sys.argv[1:])
