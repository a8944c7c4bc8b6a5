"""Time and peak memory of the pictures a run draws from a JPEG slide (issue 16).

Each case runs in its own process, so peak RSS is the case's own:

* ``full_decode`` (the reference, what ``ImageSource.thumbnail`` did before): decode the
  whole JPEG, then take every f-th pixel;
* ``thumbnail``: ``open_image(path).thumbnail(max_side)`` (a decode at 1/2-1/8 size through
  PIL's ``Image.draft``, then an area-average resize);
* ``spatial_images``: scanpy's ``hires`` (2000 px) and ``lowres`` (600 px) images for
  ``uns["spatial"]``.

    python benchmarks/thumbnail_memory.py --image ../shared/data/her2st/images/C2.jpg

prints one JSON line per case and the ratios against the reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, time
import numpy as np
from PIL import Image
from histosr.image import open_image
from histosr.outputs import spatial_images
case, path, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()  # imports above: the same in every case
if case == "full_decode":
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    f = max(1, int(np.ceil(max(a.shape[:2]) / side)))
    out = a[::f, ::f]
elif case == "thumbnail":
    out = open_image(path).thumbnail(side)
else:
    out = spatial_images(open_image(path))["hires"]
print(json.dumps({"case": case, "shape": list(out.shape), "seconds": round(time.perf_counter() - t, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="a JPEG slide (e.g. her2st C2.jpg)")
    ap.add_argument("--max-side", type=int, default=1024)
    args = ap.parse_args()
    res = {}
    for case in ("full_decode", "thumbnail", "spatial_images"):
        out = subprocess.run([sys.executable, "-c", CASE, case, args.image, str(args.max_side)],
                             capture_output=True, text=True, check=True).stdout
        res[case] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(res[case]))
    ref = res["full_decode"]
    for case in ("thumbnail", "spatial_images"):
        print(json.dumps({"case": case, "time_ratio": round(res[case]["seconds"] / ref["seconds"], 3),
                          "peak_rss_ratio": round(res[case]["peak_rss_mb"] / ref["peak_rss_mb"], 3)}))


if __name__ == "__main__":
    main()
