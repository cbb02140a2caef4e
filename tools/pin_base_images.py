"""Pin a Dockerfile's base image (``ARG FROM_IMAGE=TAG``) by digest, the tag in a comment above.

    python tools/pin_base_images.py docker/Dockerfile docker/Dockerfile.cpu
    python tools/pin_base_images.py docker/Dockerfile --digest sha256:<64 hex>   # offline

Without ``--digest`` the tag's manifest-list digest comes from
``docker buildx imagetools inspect TAG`` (needs docker and registry access). The rewritten line is
``ARG FROM_IMAGE=TAG@sha256:...`` below ``# base image tag: TAG``; a pinned file is re-pinned in
place (run it again to move to the tag's current digest after reviewing the new image).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ARG_LINE = re.compile(r"^ARG FROM_IMAGE=(?P<tag>[^@\s]+)(?:@sha256:[0-9a-f]{64})?\s*$")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
TAG_COMMENT = "# base image tag: "


def resolve_digest(tag: str) -> str:
    """The registry digest of ``tag`` (its manifest list), via docker buildx."""
    out = subprocess.run(
        ["docker", "buildx", "imagetools", "inspect", tag, "--format", "{{json .Manifest.Digest}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    digest = out.strip('"')
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"docker returned {out!r} for {tag}, not a sha256 digest")
    return digest


def pin_text(text: str, digest_for) -> str:
    """``text`` with its ``ARG FROM_IMAGE`` line pinned; ``digest_for(tag)`` gives the digest."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    pinned = 0
    for line in lines:
        match = ARG_LINE.match(line)
        if match is None:
            out.append(line)
            continue
        tag = match.group("tag")
        digest = digest_for(tag)
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"{digest!r} is not a sha256 digest")
        if out and out[-1].startswith(TAG_COMMENT):
            out.pop()
        out.append(f"{TAG_COMMENT}{tag}\n")
        out.append(f"ARG FROM_IMAGE={tag}@{digest}\n")
        pinned += 1
    if pinned != 1:
        raise ValueError(f"expected one 'ARG FROM_IMAGE=TAG' line, found {pinned}")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    """Pin each named Dockerfile in place."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dockerfiles", nargs="+", type=Path)
    parser.add_argument("--digest", default=None, help="use this digest instead of asking docker")
    args = parser.parse_args(argv)
    for path in args.dockerfiles:
        text = path.read_text(encoding="utf-8")
        new = pin_text(text, (lambda _tag: args.digest) if args.digest else resolve_digest)
        path.write_text(new, encoding="utf-8")
        print(f"pin_base_images: pinned {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
