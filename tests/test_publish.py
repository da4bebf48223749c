"""Publishing: golden tests of every apptainer command line, then real round trips through
Debian's docker-registry on loopback with a tiny signed SIF (no mocks).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import free_port

from parsl_aurora import cli
from parsl_aurora.errors import ConfigError, ImageError
from parsl_aurora.publish import (
    RegistryError,
    VerificationError,
    check_tag,
    count_signatures,
    default_tag,
    digest_tag,
    digest_text,
    format_provenance,
    inspect,
    oras_ref,
    parse_digest,
    publish,
    pull,
    pull_command,
    push_command,
    sif_add_command,
    sif_del_command,
    sif_dump_command,
    sign_command,
    signature_ids,
    verify_command,
    why_unverified,
)

APPTAINER = shutil.which("apptainer")
SHA = "b9aa5b698418a673e9a92c32d67b30119f2153d7c07fe2a0be12555d16a0c90d"
SIF_LIST = """\
------------------------------------------------------------------------------
ID   |GROUP   |LINK    |SIF POSITION (start-end)  |TYPE
------------------------------------------------------------------------------
1    |1       |NONE    |32176-32328               |Def.FILE
2    |1       |NONE    |32328-34089               |JSON.Generic
3    |1       |NONE    |36864-40960               |FS (Squashfs/*System/amd64)
4    |NONE    |1   (G) |40960-42418               |Signature (SHA-256)
5    |NONE    |1   (G) |42418-43876               |Signature (SHA-256)
"""


# ---------------------------------------------------------------- golden: command lines
def test_sign_and_verify_commands_golden():
    assert sign_command("apptainer", "k.pem", "a.sif") == [
        "apptainer", "sign", "--key", "k.pem", "a.sif"]
    assert verify_command("apptainer", "p.pem", "a.sif") == [
        "apptainer", "verify", "--key", "p.pem", "a.sif"]


def test_push_and_pull_commands_golden():
    ref = "oras://r.example:5000/pa/aurora:t1"
    assert push_command("apptainer", "a.sif", ref) == ["apptainer", "push", "a.sif", ref]
    assert push_command("apptainer", "a.sif", ref, insecure=True) == [
        "apptainer", "push", "--no-https", "a.sif", ref]
    assert pull_command("apptainer", "/d/x.sif", ref, insecure=True) == [
        "apptainer", "pull", "--no-https", "/d/x.sif", ref]


def test_digest_sif_commands_golden():
    assert sif_add_command("apptainer", "d.sif", "sha256") == [
        "apptainer", "sif", "add", "--datatype", "7", "--groupid", "1", "--filename", "sha256",
        "d.sif", "sha256"]
    assert sif_dump_command("apptainer", "d.sif") == ["apptainer", "sif", "dump", "1", "d.sif"]
    assert sif_del_command("apptainer", "a.sif", "4") == ["apptainer", "sif", "del", "4", "a.sif"]


# ---------------------------------------------------------------- pure: names and parsing
def test_oras_ref_accepts_scheme_or_not():
    assert oras_ref("127.0.0.1:5000/pa/aurora", "t1") == "oras://127.0.0.1:5000/pa/aurora:t1"
    assert oras_ref("oras://127.0.0.1:5000/pa/aurora/", "t1") == \
        "oras://127.0.0.1:5000/pa/aurora:t1"


@pytest.mark.parametrize("registry", ["127.0.0.1:5000", "127.0.0.1:5000/pa/aurora:t0"])
def test_oras_ref_rejects_registry_without_repo_or_with_tag(registry):
    with pytest.raises(ConfigError, match="REGISTRY="):
        oras_ref(registry, "t1")


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a/b", "a:b", "x" * 122])
def test_bad_tags_say_what_is_allowed(tag):
    with pytest.raises(ConfigError, match="TAG=.*letters, digits"):
        check_tag(tag)


def test_the_longest_tag_leaves_room_for_the_digest_suffix():
    assert check_tag("x" * 121) == "x" * 121  # + ".sha256": 128, OCI's longest tag


def test_default_tag_from_labels():
    labels = {"org.parsl-project.parsl.version": "2025.1.13",
              "org.opencontainers.image.revision": "8d5a104d439cbedcee0a3bf7748812f6a2c708bb"}
    assert default_tag(labels) == "parsl-2025.1.13-8d5a104"
    assert digest_tag("parsl-2025.1.13-8d5a104") == "parsl-2025.1.13-8d5a104.sha256"
    with pytest.raises(ImageError, match="revision is missing.*--tag"):
        default_tag({"org.parsl-project.parsl.version": "2025.1.13"})


def test_digest_text_round_trips_and_rejects_junk():
    assert digest_text(SHA, "t1") == f"{SHA}  t1.sif\n"
    assert parse_digest(digest_text(SHA, "t1"), "t1") == SHA
    with pytest.raises(VerificationError, match="is not `SHA256  TAG.sif`"):
        parse_digest("hello", "t1")
    with pytest.raises(VerificationError, match="digest check failed.*is for 't0.sif', not t1"):
        parse_digest(digest_text(SHA, "t0"), "t1")


def test_signatures_in_sif_list():
    assert count_signatures(SIF_LIST) == 2
    assert signature_ids(SIF_LIST) == ["4", "5"]
    assert count_signatures(SIF_LIST.split("4    |NONE")[0]) == 0


def test_why_unverified_names_the_failed_check():
    assert why_unverified("FATAL: integrity: signature not found for object group 1") == \
        "it is not signed"
    assert "not signed by this key" in why_unverified(
        "dsse: verify envelope failed: accepted signatures do not match threshold, Found: 0")
    assert "altered" in why_unverified("FATAL: integrity: object 3: hash mismatch")


def test_provenance_golden():
    labels = {"org.parsl-project.parsl.version": "2025.1.13",
              "org.opencontainers.image.version": "0.1.0",
              "org.opencontainers.image.revision": "8d5a104",
              "parsl-aurora.lock-sha256": "94ae", "parsl-aurora.stamp": "b79e",
              "parsl-aurora.source-date-epoch": "1736812800"}
    assert format_provenance("aurora.sif", labels, SHA, 1) == (
        "image:             aurora.sif\n"
        f"sha256:            {SHA}\n"
        "parsl:             2025.1.13\n"
        "parsl-aurora:      0.1.0\n"
        "git commit:        8d5a104\n"
        "lock sha256:       94ae\n"
        "SOURCE_DATE_EPOCH: 1736812800 (2025-01-14T00:00:00Z)\n"
        "stamp:             b79e\n"
        "signed:            yes, 1 signature(s) (not checked: add --verify-key PUBLIC.pem)\n"
        "rebuild:           in a checkout of the commit: nox -s reproducible -- --against "
        "aurora.sif\n")
    derived = {**labels, "parsl-aurora.extra-lock-sha256": "77aa",
               "parsl-aurora.extra-exclude-newer": "2025-06-01"}
    assert "extra lock:        77aa (as of 2025-06-01)\nstamp:" in format_provenance(
        "d.sif", derived, SHA, 0)
    assert "signed:            no (unsigned" in format_provenance("a.sif", {}, SHA, 0)
    assert "parsl:             (missing)" in format_provenance("a.sif", {}, SHA, 0)
    assert "SOURCE_DATE_EPOCH: (missing)" in format_provenance("a.sif", {}, SHA, 0)


# ---------------------------------------------------------------- real registry on loopback
needs_tools = pytest.mark.needs("apptainer", "registry")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _republish_altered(image: Path, registry: str, tag: str, offset_of) -> None:
    """Play a hostile registry: replace the pushed image with one byte flipped."""
    data = bytearray(image.read_bytes())
    data[offset_of(data)] ^= 0xFF
    bad = image.with_name("bad.sif")
    bad.write_bytes(bytes(data))
    subprocess.run(push_command(APPTAINER, str(bad), oras_ref(registry, tag), insecure=True),
                   check=True, capture_output=True)


@needs_tools
def test_round_trip_digests_equal(factory_registry, data_keys, data_image, tmp_path):
    priv, pub = data_keys["good"]
    ref, sha = publish(data_image, factory_registry, priv, insecure=True)
    assert ref.endswith(":parsl-2025.1.13-8d5a104")  # default tag from the labels
    out = tmp_path / "pulled" / "aurora.sif"
    out.parent.mkdir()
    assert pull(factory_registry, "parsl-2025.1.13-8d5a104", pub, out=out, insecure=True) == sha
    assert out.read_bytes() == data_image.read_bytes()
    assert _leftovers(out.parent) == []
    # Publishing again re-signs instead of stacking signatures, and still pulls.
    publish(data_image, factory_registry, priv, tag="again", insecure=True)
    assert count_signatures(subprocess.run([APPTAINER, "sif", "list", data_image], check=True,
                                           capture_output=True, text=True).stdout) == 1
    assert cli.main(["pull", factory_registry, "again", "--verify-key", str(pub),
                     "--out", str(out), "--insecure"]) == 0


@needs_tools
@pytest.mark.parametrize("where,check", [
    # Inside the squashfs partition (signed content): the signature check catches it.
    ("partition", "signature"),
    # In the padding between SIF objects, which no signature covers: only the digest catches it.
    ("padding", "digest"),
])
def test_flipped_byte_is_refused_and_nothing_left(factory_registry, data_keys, data_image,
                                                  tmp_path, where, check, capsys):
    priv, pub = data_keys["good"]
    publish(data_image, factory_registry, priv, tag="t1", insecure=True)
    listing = subprocess.run([APPTAINER, "sif", "list", data_image], check=True,
                             capture_output=True, text=True).stdout
    fs = next(ln for ln in listing.splitlines() if "|FS" in ln).split("|")[3].split("-")
    js = next(ln for ln in listing.splitlines() if "|JSON" in ln).split("|")[3].split("-")
    offset = {"partition": int(fs[0]) + 100, "padding": int(js[1].strip()) + 10}[where]
    _republish_altered(data_image, factory_registry, "t1", lambda data: offset)
    out = tmp_path / "aurora.sif"  # the good local image must survive the refused pull
    before = out.read_bytes()
    with pytest.raises(VerificationError) as e:
        pull(factory_registry, "t1", pub, out=out, insecure=True)
    assert e.value.check == check
    assert f"{check} check failed" in str(e.value)
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == []
    # The CLI says the same in one line and exits 2.
    assert cli.main(["pull", factory_registry, "t1", "--verify-key", str(pub), "--out",
                     str(out), "--insecure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"parsl-aurora: error: {check} check failed")


@needs_tools
def test_digest_copied_to_another_tag_is_refused(factory_registry, data_keys, data_image,
                                                 tmp_path):
    priv, pub = data_keys["good"]
    publish(data_image, factory_registry, priv, tag="old", insecure=True)
    # Replay: the (validly signed) image and digest of `old` pushed under `new`.
    subprocess.run([APPTAINER, "pull", "--no-https", "d.sif",
                    oras_ref(factory_registry, "old.sha256")], check=True, capture_output=True)
    for src, tag in ((data_image, "new"), (Path("d.sif"), "new.sha256")):
        subprocess.run(push_command(APPTAINER, str(src), oras_ref(factory_registry, tag),
                                    insecure=True), check=True, capture_output=True)
    with pytest.raises(VerificationError, match="is for 'old.sif', not new.sif"):
        pull(factory_registry, "new", pub, out=tmp_path / "new.sif", insecure=True)
    assert not (tmp_path / "new.sif").exists()


@needs_tools
def test_an_older_signed_pair_pushed_back_passes_both_checks(factory_registry, data_keys,
                                                              data_image, tmp_path):
    """Not covered (docs/publish.md): rollback. Whoever can write to the registry can put an
    older image and its digest back under the tag, and pull takes them."""
    from conftest import tiny_sif

    priv, pub = data_keys["good"]
    _, old_sha = publish(data_image, factory_registry, priv, tag="t1", insecure=True)
    old_digest = tmp_path / "old-digest.sif"
    subprocess.run([APPTAINER, "pull", "--no-https", str(old_digest),
                    oras_ref(factory_registry, "t1.sha256")], check=True, capture_output=True)
    newer_dir = tmp_path / "newer"
    newer_dir.mkdir()
    newer = tiny_sif(newer_dir, {"org.parsl-project.parsl.version": "2025.2.1"})
    _, new_sha = publish(newer, factory_registry, priv, tag="t1", insecure=True)
    assert new_sha != old_sha
    for src, tag in ((data_image, "t1"), (old_digest, "t1.sha256")):
        subprocess.run(push_command(APPTAINER, str(src), oras_ref(factory_registry, tag),
                                    insecure=True), check=True, capture_output=True)
    assert pull(factory_registry, "t1", pub, out=tmp_path / "got.sif", insecure=True) == old_sha


@needs_tools
def test_wrong_key_is_refused(factory_registry, data_keys, data_image, tmp_path):
    publish(data_image, factory_registry, data_keys["good"][0], tag="t1", insecure=True)
    out = tmp_path / "new.sif"
    with pytest.raises(VerificationError, match="signature check failed.*not signed by this key"):
        pull(factory_registry, "t1", data_keys["other"][1], out=out, insecure=True)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


@needs_tools
def test_unsigned_image_is_refused(factory_registry, data_keys, data_tiny_sif, data_image,
                                   tmp_path):
    priv, pub = data_keys["good"]
    publish(data_image, factory_registry, priv, tag="t1", insecure=True)
    # Someone pushes an unsigned image over the tag (the digest beside it stays the signed one's).
    subprocess.run(push_command(APPTAINER, str(data_tiny_sif),
                                oras_ref(factory_registry, "t1"), insecure=True),
                   check=True, capture_output=True)
    out = tmp_path / "new.sif"
    with pytest.raises(VerificationError, match="signature check failed.*it is not signed"):
        pull(factory_registry, "t1", pub, out=out, insecure=True)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


@needs_tools
def test_unreachable_registry_is_clear_and_keeps_local_image(data_keys, data_image, tmp_path,
                                                             capsys):
    dead = f"127.0.0.1:{free_port()}/parsl-aurora/aurora"  # nothing listens there
    before = data_image.read_bytes()
    with pytest.raises(RegistryError, match=r"cannot pull the published digest oras://127"):
        pull(dead, "t1", data_keys["good"][1], out=data_image, insecure=True)
    assert data_image.read_bytes() == before
    assert _leftovers(tmp_path) == []
    assert cli.main(["pull", dead, "t1", "--verify-key", str(data_keys["good"][1]),
                     "--out", str(data_image), "--insecure"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("+ ")]
    assert len(err) == 1 and "registry is up" in err[0], err
    print(err[0])
    # The image is pushed first, its digest only after: a reader in between sees the old
    # digest, and refuses the new image.
    with pytest.raises(RegistryError, match=r"cannot push to oras://\S+/aurora:t1: "):
        publish(data_image, dead, data_keys["good"][0], tag="t1", insecure=True)


@pytest.mark.needs("apptainer")
def test_a_stale_signature_by_another_key_fails_verification(data_keys, data_image):
    """Why publish drops old signatures: apptainer verify wants every signature to check out."""
    for who in ("other", "good"):
        subprocess.run(sign_command(APPTAINER, str(data_keys[who][0]), str(data_image)),
                       check=True, capture_output=True)
    out = subprocess.run(verify_command(APPTAINER, str(data_keys["good"][1]), str(data_image)),
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0, out.stderr


@pytest.mark.needs("apptainer")
def test_a_failed_sign_leaves_the_image_as_it_was(data_keys, data_image, tmp_path):
    """Signed already (publish drops that signature from its copy before signing), then a
    publish whose key apptainer cannot use: the image keeps every byte."""
    subprocess.run(sign_command(APPTAINER, str(data_keys["good"][0]), str(data_image)),
                   check=True, capture_output=True)
    before = data_image.read_bytes()
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    with pytest.raises(ImageError, match="cannot sign"):
        publish(data_image, f"127.0.0.1:{free_port()}/pa/aurora", bad, tag="t1", insecure=True)
    assert data_image.read_bytes() == before
    assert _leftovers(data_image.parent) == []


@needs_tools
def test_missing_key_names_the_flag(factory_registry, tmp_path):
    with pytest.raises(ConfigError, match="--verify-key=.*openssl genrsa"):
        pull(factory_registry, "t1", tmp_path / "nope.pem", insecure=True)


# ---------------------------------------------------------------- inspect
@pytest.mark.needs("apptainer")
def test_inspect_signed_and_unsigned(data_keys, data_image, capsys):
    priv, pub = data_keys["good"]
    text = inspect(data_image)
    assert "parsl:             2025.1.13\n" in text
    assert "git commit:        8d5a104d439cbedcee0a3bf7748812f6a2c708bb\n" in text
    assert "SOURCE_DATE_EPOCH: 1736812800 (2025-01-14T00:00:00Z)\n" in text
    assert "signed:            no" in text
    subprocess.run(sign_command(APPTAINER, str(priv), str(data_image)), check=True,
                   capture_output=True)
    assert "signed:            yes, 1 signature(s) (not checked" in inspect(data_image)
    assert f"verified with {pub}" in inspect(data_image, pub)
    assert "NOT verified" in inspect(data_image, data_keys["other"][1])
    assert cli.main(["inspect", str(data_image)]) == 0
    assert "stamp:             b79ef748" in capsys.readouterr().out
    os.remove(data_image)
    assert cli.main(["inspect", str(data_image)]) == 2
