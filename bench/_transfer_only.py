"""Moving the bytes alone, for bench_hub.py: what a conversion would take if quantizing were free.

    HF_ENDPOINT=... HF_TOKEN=... python bench/_transfer_only.py SRC_REPO DST_REPO OUT_SIZES_JSON

The same client code as a conversion (streamer's HubSource range reads, HubSink uploads and one
commit), the same server and link, and the same bytes: every source shard is read whole, in
order, and as soon as shard i has arrived an output shard of the size streamer produced for it
is uploaded (its content is taken from the bytes just read, so no two shards share an LFS object
and nothing is skipped). Nothing is quantized. Timed after the imports, like the baseline's
phases. Prints `@@RESULT {"seconds": s, "bytes_in": n, "bytes_out": n}`.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamer.io.hub_sink import HubSink  # noqa: E402
from streamer.io.hub_source import HubSource  # noqa: E402
from streamer.io.source import Span  # noqa: E402


def main() -> None:
    src_repo, dst_repo, sizes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    t0 = time.perf_counter()
    source = HubSource(src_repo)
    sink = HubSink(dst_repo)
    sink.check()
    sink.begin()
    files = source.files()
    uploads = []
    bytes_in = 0
    for name, out_size in sizes:
        data = bytearray(files[name])
        source.read_into(name, Span(0, len(data)), memoryview(data))
        bytes_in += len(data)
        writer = sink.open_shard(name, out_size)
        view = memoryview(data)
        for pos in range(0, out_size, len(data)):  # an output larger than its input repeats it
            n = min(len(data), out_size - pos)
            writer.write_at(pos, view[:n])
        del view, data
        uploads.append(writer.close())
    for f in uploads:
        f.result()
    sink.commit("transfer only")
    seconds = time.perf_counter() - t0
    sink.close()
    source.close()
    print("@@RESULT " + json.dumps({"seconds": seconds, "bytes_in": bytes_in, "bytes_out": sum(n for _, n in sizes)}),
          flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    main()
