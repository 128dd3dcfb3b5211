"""Peak resident memory of an embedder under a burst of large Embed requests: what its pod's memory limit must hold.

    .venv/bin/python scripts/embedder_request_memory.py CLIENTS IMAGES MODEL_DIR [embedder flags...]

CLIENTS threads each send one request of IMAGES camera-sized JPEGs (3000x2000, about 2.8 MB each) at once, twice;
the embedder runs as its own process with the given flags, and its high-water mark (VmHWM) is printed with what
the calls returned. A gRPC server receives a message whole before its handler runs, so the burst's memory
follows the bytes in flight: at most handler threads x the largest message.
"""
from __future__ import annotations

import io
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from lookalike.tools.processes import running_service
from lookalike.v1 import embedder_pb2, embedder_pb2_grpc

ROUNDS = 2


def camera_photo() -> bytes:
    """A 3000x2000 JPEG of noise at quality 60: about 2.8 MB, as large as a phone camera's photo."""
    pixels = np.random.default_rng(0).integers(0, 255, (2000, 3000, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG", quality=60)
    return encoded.getvalue()


def peak_resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def main(clients: int, images: int, model: str, flags: list[str]) -> None:
    photo = camera_photo()
    print(f"photo {len(photo) / 1e6:.2f} MB, request {images * len(photo) / 2**20:.1f} MiB, flags {flags}")
    with running_service("lookalike.embedder", ["--model", model, *flags]) as (process, port):
        time.sleep(2)
        at_start = peak_resident_mib(process.pid)
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        stub = embedder_pb2_grpc.EmbedderStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=unlimited))
        outcomes: Counter[str] = Counter()
        lock = threading.Lock()

        def send(client: int) -> None:
            request = embedder_pb2.EmbedRequest(images=[embedder_pb2.Image(data=photo, id=f"{client}-{n}")
                                                        for n in range(images)])
            try:
                results = stub.Embed(request, timeout=600).results
                outcome = "some refused" if any(result.HasField("error") for result in results) else "OK"
            except grpc.RpcError as error:
                outcome = error.code().name
            with lock:
                outcomes[outcome] += 1

        for _ in range(ROUNDS):
            threads = [threading.Thread(target=send, args=(client,)) for client in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        print(f"{clients} clients x {images} images, {ROUNDS} rounds: peak resident {peak_resident_mib(process.pid):.0f} "
              f"MiB (at start {at_start:.0f} MiB); calls {dict(outcomes)}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
