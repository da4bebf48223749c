"""Publish aurora.sif to an OCI registry (signed, with its sha256 beside it) and pull it back
only after both the signature and the digest check out; also report an image's provenance.

Pure functions build every apptainer command line; `publish()`, `pull()`, `inspect()` run them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from parsl_aurora.errors import ConfigError, ImageError, run_main
from parsl_aurora.image.build import apptainer, install_image
from parsl_aurora.image.inputs import (
    IMAGE,
    LABEL_EXTRA_DATE,
    LABEL_EXTRA_LOCK,
    LABEL_PARSL,
    LABEL_SDE,
    LABEL_STAMP,
    iso_date,
)
from parsl_aurora.image.sif import labels_from_inspect

# The published digest travels as a second, tiny SIF at TAG + DIGEST_SUFFIX: apptainer can only
# push SIF files, and a SIF can carry a plain data object that is signed like any image.
DIGEST_SUFFIX = ".sha256"
# A data object must be in a group to be signable (`integrity: no groups found` otherwise).
DIGEST_GROUP = "1"
DIGEST_OBJECT_ID = "1"
LABEL_COMMIT = "org.opencontainers.image.revision"
LABEL_VERSION = "org.opencontainers.image.version"
LABEL_LOCK = "parsl-aurora.lock-sha256"
# OCI distribution spec: what a tag may look like.
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# OCI distribution spec: a repository name, '/'-separated lowercase parts.
_PART = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPO_RE = re.compile(rf"{_PART}(?:/{_PART})*")
# Push/pull of ~60 MB on a login node; longer than this is a hung connection, not a slow one.
TIMEOUT_S = 1800


class RegistryError(ImageError):
    """The registry could not be reached, or refused a push or pull."""


class VerificationError(ImageError):
    """A pulled image failed a check; `check` names which one (signature, digest)."""

    def __init__(self, check: str, message: str):
        self.check = check
        super().__init__(message)


# ---------------------------------------------------------------- pure: names
def oras_ref(registry: str, tag: str) -> str:
    """`oras://HOST[:PORT]/REPO:TAG` from REGISTRY (HOST/REPO, `oras://` optional) and TAG.

    Checked the way apptainer (go-containerregistry) will read it, so that a mistake is named
    here rather than coming back as a failure to reach Docker Hub.
    """
    repo = registry.removeprefix("oras://").rstrip("/")
    if "/" not in repo or repo.startswith("/"):
        raise ConfigError("REGISTRY", registry, "HOST[:PORT]/REPO",
                          "name a repository too, e.g. 127.0.0.1:5000/parsl-aurora/aurora")
    host, path = repo.split("/", 1)
    if ":" in path.rsplit("/", 1)[-1]:
        raise ConfigError("REGISTRY", registry, "HOST[:PORT]/REPO without a tag",
                          "give the tag separately: REGISTRY TAG")
    if "." not in host and ":" not in host:
        # go-containerregistry takes the first part for a host only if it holds a '.' or a
        # ':'; otherwise the whole of it is a repository on Docker Hub (even `localhost`).
        raise ConfigError("REGISTRY", registry, "HOST[:PORT]/REPO with a HOST that has a '.' "
                          "or a :PORT (apptainer would read "
                          f"{host!r} as part of a Docker Hub repository)",
                          f"write the port ({host}:5000/{path}, or {host}:443/{path} for https) "
                          f"or the host's full name; for Docker Hub write docker.io/{repo}")
    if not REPO_RE.fullmatch(path) or len(path) < 2:
        raise ConfigError("REGISTRY", registry, "a REPO of lowercase letters, digits and "
                          "'.', '_', '-' between '/'-separated parts, at least 2 characters "
                          "(apptainer cannot parse a shorter one)",
                          f"rename the repository, e.g. {host}/parsl-aurora/aurora")
    check_tag(tag)
    return f"oras://{repo}:{tag}"


def check_tag(tag: str) -> str:
    # The digest tag is TAG + ".sha256", so TAG must leave room for the suffix.
    if not TAG_RE.fullmatch(tag) or len(tag) + len(DIGEST_SUFFIX) > 128:
        raise ConfigError("TAG", tag, "letters, digits, '_', '.', '-', not starting with '.' or "
                          f"'-', at most {128 - len(DIGEST_SUFFIX)} characters",
                          "pick a tag like parsl-2025.1.13-8d5a104")
    return tag


def digest_tag(tag: str) -> str:
    return check_tag(tag) + DIGEST_SUFFIX


def default_tag(labels: Mapping[str, str]) -> str:
    """`parsl-<parsl version>-<short commit>`, from the image's own labels."""
    parsl, commit = labels.get(LABEL_PARSL), labels.get(LABEL_COMMIT)
    if not parsl or not commit:
        missing = LABEL_PARSL if not parsl else LABEL_COMMIT
        raise ImageError(f"label {missing} is missing from the image, so there is no default "
                         "tag; pass --tag, or rebuild with `python -m parsl_aurora.image build`")
    return check_tag(f"parsl-{parsl}-{commit[:7]}")


def digest_text(sha256: str, tag: str) -> str:
    """The published digest, in `sha256sum` format (`sha256sum -c` works on `TAG.sif`).

    Naming the tag stops a signed digest (with its signed image) being copied to another tag.
    """
    return f"{sha256}  {tag}.sif\n"


def parse_digest(text: str, tag: str) -> str:
    words = text.split()
    if len(words) != 2 or not re.fullmatch(r"[0-9a-f]{64}", words[0]):
        raise VerificationError("digest", f"the published digest {text[:80]!r} is not "
                                "`SHA256  TAG.sif`; republish with `nox -s publish`")
    if words[1] != f"{tag}.sif":
        raise VerificationError("digest", f"digest check failed: the digest published at "
                                f"{tag}{DIGEST_SUFFIX} is for {words[1]!r}, not {tag}.sif (copied "
                                "between tags?); refusing it. Republish with `nox -s publish`")
    return words[0]


def count_signatures(sif_list_text: str) -> int:
    """Signature objects in `apptainer sif list` output."""
    return sum(1 for line in sif_list_text.splitlines() if "|Signature" in line)


def signature_ids(sif_list_text: str) -> list[str]:
    """IDs of the signature objects in `apptainer sif list` output."""
    return [line.split("|")[0].strip() for line in sif_list_text.splitlines()
            if "|Signature" in line]


def why_unverified(apptainer_stderr: str) -> str:
    """apptainer verify's FATAL line, turned into which check failed in words."""
    text = apptainer_stderr
    if "signature not found" in text or "no signatures" in text.lower():
        return "it is not signed"
    if "accepted signatures do not match threshold" in text:
        return "it is not signed by this key"
    return "its signed content does not match its signature (altered)"


def last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith(("FATAL", "ERROR"))]
    return (fatal or lines or ["no output"])[-1]


# ---------------------------------------------------------------- pure: command lines
def sign_command(exe: str, key: str, image: str) -> list[str]:
    return [exe, "sign", "--key", key, image]


def verify_command(exe: str, key: str, image: str) -> list[str]:
    return [exe, "verify", "--key", key, image]


def push_command(exe: str, image: str, ref: str, insecure: bool = False) -> list[str]:
    return [exe, "push", *(["--no-https"] if insecure else []), image, ref]


def pull_command(exe: str, dest: str, ref: str, insecure: bool = False) -> list[str]:
    return [exe, "pull", *(["--no-https"] if insecure else []), dest, ref]


def sif_new_command(exe: str, sif: str) -> list[str]:
    return [exe, "sif", "new", sif]


def sif_add_command(exe: str, sif: str, data: str) -> list[str]:
    # Datatype 7 is "Generic": raw bytes, no meaning to apptainer beyond being signable.
    return [exe, "sif", "add", "--datatype", "7", "--groupid", DIGEST_GROUP,
            "--filename", "sha256", sif, data]


def sif_del_command(exe: str, sif: str, object_id: str) -> list[str]:
    return [exe, "sif", "del", object_id, sif]


def sif_dump_command(exe: str, sif: str) -> list[str]:
    return [exe, "sif", "dump", DIGEST_OBJECT_ID, sif]


def sif_list_command(exe: str, sif: str) -> list[str]:
    return [exe, "sif", "list", sif]


def inspect_command(exe: str, image: str) -> list[str]:
    return [exe, "inspect", "--json", "--labels", image]


# ---------------------------------------------------------------- pure: inspect output
def format_provenance(image: str, labels: Mapping[str, str], sha256: str, signatures: int,
                      verified: str | None = None) -> str:
    """What `parsl-aurora inspect` prints: where the image came from and whether it is signed."""
    def get(key):
        return labels.get(key, "(missing)")
    if signatures == 0:
        signed = "no (unsigned; `nox -s publish` signs it)"
    elif verified is None:
        signed = f"yes, {signatures} signature(s) (not checked: add --verify-key PUBLIC.pem)"
    else:
        signed = f"yes, {signatures} signature(s); {verified}"
    sde = labels.get(LABEL_SDE)
    if sde and sde.lstrip("-").isdigit():
        sde = f"{sde} ({iso_date(int(sde))})"
    rows = [("image", image), ("sha256", sha256), ("parsl", get(LABEL_PARSL)),
            ("parsl-aurora", get(LABEL_VERSION)), ("git commit", get(LABEL_COMMIT)),
            ("lock sha256", get(LABEL_LOCK)), ("SOURCE_DATE_EPOCH", sde or "(missing)")]
    if LABEL_EXTRA_LOCK in labels:  # an image with a user's own packages (build --extra)
        extra = f"{labels[LABEL_EXTRA_LOCK]} (as of {labels.get(LABEL_EXTRA_DATE, '?')})"
        rows += [("extra lock", extra)]
    rebuild = f"in a checkout of the commit: nox -s reproducible -- --against {image}"
    rows += [("stamp", get(LABEL_STAMP)), ("signed", signed), ("rebuild", rebuild)]
    return "".join(f"{k + ':':<19}{v}\n" for k, v in rows)


# ---------------------------------------------------------------- effects
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], *, what: str, error=ImageError, quiet: bool = False,
         fix: str = "") -> str:
    """Run CMD; on failure raise ERROR naming WHAT, apptainer's own last error line and FIX."""
    fix = f". Fix: {fix}" if fix else ""
    if not quiet:
        print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise error(f"{what}: no answer after {TIMEOUT_S} s from `{shlex.join(cmd)}`; "
                    f"check the network path to the registry{fix}") from None
    if r.returncode != 0:
        raise error(f"{what}: {last_error_line(r.stderr)}{fix}")
    return r.stdout


def _key_file(path: Path, kind: str, flag: str) -> Path:
    if not path.is_file():
        raise ConfigError(flag, str(path), f"an existing {kind} PEM file",
                          "create a pair with `openssl genrsa -out private.pem 3072 && openssl "
                          "rsa -in private.pem -pubout -out public.pem`")
    return path


def _registry_hint(insecure: bool) -> str:
    return ("check REGISTRY and TAG, that the registry is up and, for a pull, that TAG was "
            "published"
            + ("" if insecure else "; a plain-http registry needs --insecure (INSECURE=1)"))


def publish(image: Path, registry: str, key: Path, *, tag: str | None = None,
            insecure: bool = False) -> tuple[str, str]:
    """Sign IMAGE in place, push it to REGISTRY:TAG and its signed sha256 to TAG.sha256.

    Returns (image reference, sha256).
    """
    exe = apptainer()
    _key_file(key, "private", "--key")
    if not image.is_file():
        raise ImageError(f"{image} does not exist; build it with `nox -s image`")
    tag = tag or default_tag(labels_from_inspect(
        _run(inspect_command(exe, str(image)), what=f"cannot read labels of {image}",
             fix="check the path, or rebuild the image with `make image`")))
    ref = oras_ref(registry, tag)
    # Sign a copy and rename it over: a failed sign (bad key) leaves the image as it was, and
    # a re-publish replaces old signatures instead of stacking them.
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=image.parent) as tmp:
        # The copy lives in this private (0700) folder until it is renamed: under a loose umask
        # nobody else can open it and change what gets signed.
        signing = Path(tmp) / "signing.sif"  # removed with the folder if anything fails
        shutil.copyfile(image, signing)
        # apptainer verify needs every signature to check out, so an old signature (maybe
        # another key's) next to ours would fail every pull: drop it, then sign afresh.
        listing = _run(sif_list_command(exe, str(signing)), what="sif list", quiet=True)
        for obj in reversed(signature_ids(listing)):
            _run(sif_del_command(exe, str(signing), obj), what="cannot drop old signature")
        _run(sign_command(exe, str(key), str(signing)), what=f"cannot sign {image}")
        # The owner's mode, but never world-writable (a loose umask or an old chmod).
        os.chmod(signing, stat.S_IMODE(image.stat().st_mode) & ~0o002)
        signing.replace(image)
        sha = sha256_file(image)
        data = Path(tmp) / "sha256"
        data.write_text(digest_text(sha, tag))
        dsif = Path(tmp) / "digest.sif"
        _run(sif_new_command(exe, str(dsif)), what="cannot create the digest SIF", quiet=True)
        _run(sif_add_command(exe, str(dsif), str(data)), what="cannot fill the digest SIF",
             quiet=True)
        _run(sign_command(exe, str(key), str(dsif)), what="cannot sign the digest SIF")
        # Image first: a reader between the two pushes sees an old digest and refuses; never
        # a new digest that an old image would be checked against and pass.
        hint = _registry_hint(insecure)
        _run(push_command(exe, str(image), ref, insecure),
             what=f"cannot push to {ref}", error=RegistryError, fix=hint)
        dref = oras_ref(registry, digest_tag(tag))
        _run(push_command(exe, str(dsif), dref, insecure),
             what=f"cannot push to {dref}", error=RegistryError, fix=hint)
    return ref, sha


def pull(registry: str, tag: str, verify_key: Path, *, out: Path = Path(IMAGE),
         insecure: bool = False) -> str:
    """Pull REGISTRY:TAG to OUT only if it is signed by VERIFY_KEY and matches its published
    sha256. Returns the sha256. On any failure OUT is untouched and nothing else is left.
    """
    exe = apptainer()
    _key_file(verify_key, "public", "--verify-key")
    ref, dref = oras_ref(registry, tag), oras_ref(registry, digest_tag(tag))
    out = out.absolute()
    if not out.parent.is_dir():
        raise ConfigError("--out", str(out), "a path in an existing directory",
                          f"create {out.parent} first")
    hint = _registry_hint(insecure)
    # Next to OUT, so the final rename is atomic (same filesystem); removed whatever happens.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.pull-", dir=out.parent) as tmp:
        dsif, image = Path(tmp) / "digest.sif", Path(tmp) / "image.sif"
        _run(pull_command(exe, str(dsif), dref, insecure),
             what=f"cannot pull the published digest {dref}", error=RegistryError, fix=hint)
        _verify(exe, verify_key, dsif, f"the published digest {dref}")
        want = parse_digest(_run(sif_dump_command(exe, str(dsif)), what="sif dump", quiet=True),
                            tag)
        _run(pull_command(exe, str(image), ref, insecure),
             what=f"cannot pull {ref}", error=RegistryError, fix=hint)
        _verify(exe, verify_key, image, ref)
        have = sha256_file(image)
        if have != want:
            raise VerificationError(
                "digest", f"digest check failed: {ref} has sha256 {have} but {want} was "
                f"published; refusing it (nothing written to {out}). Republish, or ask who "
                "can write to the registry")
        install_image(image, out)
    return have


def _verify(exe: str, key: Path, sif: Path, name: str) -> None:
    r = subprocess.run(verify_command(exe, str(key), str(sif)), check=False,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise VerificationError(
            "signature", f"signature check failed: {name}: {why_unverified(r.stderr)} "
            f"({last_error_line(r.stderr)}); refusing it. Fix: check --verify-key {key} is "
            "the publisher's public key, or republish")


def inspect(image: Path, verify_key: Path | None = None) -> str:
    exe = apptainer()
    if not image.is_file():
        raise ImageError(f"{image} does not exist; build it (`nox -s image`) or pull it "
                         "(`parsl-aurora pull REGISTRY TAG --verify-key PUBLIC.pem`)")
    labels = labels_from_inspect(_run(inspect_command(exe, str(image)),
                                      what=f"cannot read labels of {image}", quiet=True,
                                      fix="is it a SIF image? Rebuild it with `make image` "
                                          "or pull it again"))
    sigs = count_signatures(_run(sif_list_command(exe, str(image)),
                                 what=f"cannot list {image}", quiet=True))
    verified = None
    if verify_key is not None and sigs:
        _key_file(verify_key, "public", "--verify-key")
        r = subprocess.run(verify_command(exe, str(verify_key), str(image)),
                           check=False, capture_output=True, text=True)
        verified = ("verified with " + str(verify_key) if r.returncode == 0
                    else f"NOT verified with {verify_key}: {why_unverified(r.stderr)}")
    return format_provenance(str(image), labels, sha256_file(image), sigs, verified)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parsl_aurora.publish",
                                description="Sign aurora.sif and push it, with its sha256, to "
                                            "oras://REGISTRY:TAG (and REGISTRY:TAG.sha256).")
    p.add_argument("registry", help="HOST[:PORT]/REPO, e.g. 127.0.0.1:5000/parsl-aurora/aurora")
    p.add_argument("--key", type=Path, required=True, help="private PEM key to sign with "
                   "(kept out of the repository)")
    p.add_argument("--tag", default=None, help="default: parsl-<parsl version>-<short commit> "
                   "from the image labels")
    p.add_argument("--image", type=Path, default=Path(IMAGE), help=f"default: {IMAGE}")
    p.add_argument("--insecure", action="store_true",
                   default=os.environ.get("INSECURE", "") not in ("", "0"),
                   help="plain-http registry (apptainer --no-https); default from INSECURE=1")
    a = p.parse_args(argv)

    def run() -> int:
        ref, sha = publish(a.image, a.registry, a.key, tag=a.tag, insecure=a.insecure)
        print(f"published {ref} (sha256 {sha}) and its digest at {ref}{DIGEST_SUFFIX}")
        return 0

    return run_main(run, p.prog)


if __name__ == "__main__":
    sys.exit(main())
