"""The ``modelseal`` command: a thin shell over the library.

Every command has ``--help``; those that report take ``--json``. Expected failures print one line
``modelseal: error: ...`` on stderr and exit 1 (usage errors too); never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from modelseal import atomicfile
from modelseal.cli.helptext import IDENTITY_VARS
from modelseal.cli.kit import OneLineErrors, emit, fail_closed, json_option, out, require_inputs
from modelseal.cli.progress import byte_progress
from modelseal.crypto.signing import Signer
from modelseal.errors import UsageError
from modelseal.load.artifacts import resolve_identity
from modelseal.recipients.base import Identity
from modelseal.recipients.hpke import KEMS, HpkeIdentity
from modelseal.recipients.passphrase import Passphrase
from modelseal.recipients.symmetric import SymmetricKey
from modelseal.sealing import operations

identity_option = click.option(
    "-i",
    "--identity",
    "identities",
    multiple=True,
    metavar="IDENTITY",
    help="Identity to unwrap the data key (repeatable): a key file, env:VAR, passphrase-env:VAR, agent:SOCKET, "
    "or the key text itself. Default: $MODELSEAL_IDENTITY, then the agent at $MODELSEAL_AGENT_SOCKET.",
)
passphrase_option = click.option(
    "--passphrase-env", metavar="VAR", help="Read a passphrase from this environment variable."
)


def identity_spec(identities: tuple[str, ...], passphrase_env: str | None) -> list[Any] | None:
    """The identity options as one spec for :func:`resolve_identity` (None: none given on the command line)."""
    spec: list[Any] = list(identities)
    if passphrase_env:
        spec.append(Passphrase.from_env(passphrase_env))
    return spec or None


def command_identity(
    identities: tuple[str, ...], passphrase_env: str | None, *, optional: bool = False
) -> Identity | None:
    """The command's identity, resolved once by the one resolver (the options, else the environment).

    With ``optional`` (``verify --trusted-signer`` alone needs no key) and no identity option, None.
    """
    spec = identity_spec(identities, passphrase_env)
    if spec is None and optional:
        return None
    return resolve_identity(spec)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="modelseal")
def main() -> None:
    """Seal model weights for the hosts you authorise; load them from memory at full speed."""


@main.command(
    writes=[
        ("OUTPUT", "The secret key file, mode 0600."),
        ("OUTPUT's stem.pub", "Its public part, beside it (host.key -> host.pub); none for --symmetric."),
    ]
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Where to write the secret key file (mode 0600); the public part goes next to it, as NAME.pub.",
)
@click.option("--signing", is_flag=True, help="Make an Ed25519 publisher signing key instead of a host identity.")
@click.option("--symmetric", is_flag=True, help="Make a raw 256-bit symmetric key file (it has no public part).")
@click.option(
    "--kind",
    type=click.Choice(sorted(KEMS)),
    default="x25519",
    show_default=True,
    help="Host identity type; mlkem768x25519 is the post-quantum hybrid.",
)
@click.option("--force", is_flag=True, help="Overwrite existing key and public files.")
@json_option
@fail_closed
def keygen(output: str, signing: bool, symmetric: bool, kind: str, force: bool, as_json: bool) -> None:
    """Create a host identity (default), a signing key or a symmetric key; print its public part.

    A host identity's recipient (``x25519:...``) and a signing key's ``ed25519:...`` are also written
    to NAME.pub next to the key file, for ``seal -r NAME.pub`` and ``--trusted-signer NAME.pub``.
    """
    if signing and symmetric:
        raise click.UsageError("--signing and --symmetric are exclusive")
    atomicfile.check_target(output, overwrite=force)
    pub_file = None if symmetric else public_file_for(Path(output))
    if pub_file is not None:
        atomicfile.check_target(pub_file, overwrite=force)
    key: Signer | SymmetricKey | HpkeIdentity
    if signing:
        key = Signer.generate()
        public, what = key.public, "signing key"
    elif symmetric:
        key = SymmetricKey.generate()
        public, what = f"symmetric:{Path(output).resolve()}", "symmetric key"
    else:
        key = HpkeIdentity.generate(KEMS[kind])
        public, what = key.recipient.describe(), f"{kind} identity"
    key.save(output, force)
    if pub_file is not None:
        try:
            text = f"# modelseal {what}: public part of {Path(output).name} (safe to share)\n{public}\n"
            atomicfile.write_bytes(pub_file, text.encode(), atomicfile.default_mode(), overwrite=force)
        except BaseException:
            Path(output).unlink(missing_ok=True)  # no key without its public file: nobody has seen it yet
            raise
    emit(
        as_json,
        {"file": output, "public_file": None if pub_file is None else str(pub_file), "type": what, "public": public},
        [public],
    )
    if not as_json:
        click.echo(f"wrote {what} to {output}" + (f" and its public part to {pub_file}" if pub_file else ""), err=True)


def public_file_for(key_file: Path) -> Path:
    """``host.key`` -> ``host.pub`` (``host`` -> ``host.pub``)."""
    if key_file.suffix == ".pub":
        raise UsageError(f"{key_file}: name the secret key file something not ending in .pub (that is its public file)")
    return key_file.with_suffix(".pub") if key_file.suffix else key_file.with_name(key_file.name + ".pub")


# With -r keyserver:...: the admin API registers the data key (the URL is in the recipient).
KEYSERVER_RECIPIENT_VARS = [
    ("MODELSEAL_KEYSERVER_CA", "With keyserver:... recipients: the CA the key service's certificate must chain to."),
    ("MODELSEAL_ADMIN_TOKEN", "With keyserver:... recipients: the admin token that registers the data key."),
    ("MODELSEAL_ADMIN_TOKEN_FILE", "Else, the file holding it (DIR/admin.token)."),
]
SEAL_VAR = ("VAR", "The variable --passphrase-env VAR names (a passphrase), or --fingerprint-key env:VAR (the key).")
IDENTITY_VAR = ("VAR", "The variable --passphrase-env VAR or -i env:VAR names: a passphrase or identity text.")


@main.command(
    reads=["MODELSEAL_THREADS", *KEYSERVER_RECIPIENT_VARS, SEAL_VAR,
           ("MODELSEAL_REMOTE_PART_SIZE", "With -o s3://...: bytes per uploaded part (default 16M, at least 5M)."),
           ("MODELSEAL_REMOTE_CONCURRENCY", "With -o s3://...: parts uploading at once (default 4).")],
    writes=[("OUTPUT", "The sealed file; for a directory SRC, a directory of sealed files (not secret). An "
                       "s3://BUCKET/KEY (or s3://BUCKET/PREFIX/) is uploaded as it is sealed: no file on disk.")],
)  # fmt: skip
@click.argument("src", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Sealed file (or directory, for a directory SRC); its directory must exist. Or s3://BUCKET/KEY.",
)
@click.option(
    "-r",
    "--recipient",
    "recipients",
    multiple=True,
    metavar="RECIPIENT",
    help="x25519:..., mlkem768x25519:..., symmetric:PATH, a public-key file... (repeatable).",
)
@passphrase_option
@click.option("--model-id", help="Model id bound into every segment (default: SRC's name).")
@click.option("--model-version", default="1", show_default=True, help="Model version bound into every segment.")
@click.option("--hide-header", is_flag=True, help="Encrypt tensor names, dtypes and shapes too.")
@click.option("--sign-key", type=click.Path(), help="Ed25519 key from `keygen --signing`.")
@click.option("--segment-size", type=int, default=4 << 20, show_default=True, help="Bytes per authenticated segment.")
@click.option(
    "--as-bundle", is_flag=True, help="Seal SRC as an opaque bundle even if it is safetensors or a checkpoint."
)
@click.option(
    "--fingerprint",
    "licence",
    metavar="LICENCE_ID",
    help="Mark the weights for this licence (docs/fingerprinting.md); needs --fingerprint-key. Tensor formats only.",
)
@click.option(
    "--fingerprint-key",
    metavar="FILE|env:VAR",
    help="The owner's fingerprint key: a file from `fingerprint keygen`, or env:VAR holding its text.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@json_option
@fail_closed
def seal(
    src: str,
    output: str,
    recipients: tuple[str, ...],
    passphrase_env: str | None,
    model_id: str | None,
    model_version: str,
    hide_header: bool,
    sign_key: str | None,
    segment_size: int,
    as_bundle: bool,
    licence: str | None,
    fingerprint_key: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Encrypt SRC (.safetensors, .pt/.pth/.bin, .onnx, any file, or a directory) for RECIPIENTs.

    With --fingerprint, the sealed copy's weights carry a pattern that `modelseal trace` links to that
    licence; the marking happens in memory, before encryption.
    """
    from modelseal.sealing.writer import plan_size
    from modelseal.sealing.writer import seal as do_seal

    require_inputs(src)
    fingerprint = None
    if (licence is None) != (fingerprint_key is None):
        raise UsageError("--fingerprint LICENCE_ID and --fingerprint-key go together")
    if licence is not None and fingerprint_key is not None:
        from modelseal.sealing.fingerprint import Fingerprint, FingerprintKey

        fingerprint = Fingerprint(FingerprintKey.load(fingerprint_key), licence)

    recips: list[Any] = list(recipients)
    if passphrase_env:
        recips.append(Passphrase.from_env(passphrase_env))
    with byte_progress("sealing", plan_size(Path(src)), not as_json) as advance:
        result = do_seal(
            src,
            output,
            recips,
            model_id=model_id,
            model_version=model_version,
            hide_header=hide_header,
            signer=sign_key,
            segment_size=segment_size,
            as_bundle=as_bundle,
            progress=advance,
            force=force,
            fingerprint=fingerprint,
        )
    data = {"model_id": result.model_id, "model_version": result.model_version, "outputs": result.outputs}
    emit(
        as_json,
        data,
        [
            f"sealed {o['source']} -> {o['output']} ({o['kind']}"
            f"{', hidden header' if o['hidden_header'] else ''}"
            f"{', signed' if o['signed'] else ''}"
            f"{_marked(o.get('fingerprint'))})"
            for o in result.outputs
        ],
    )


def _marked(mark: Any) -> str:
    """``seal``'s human line for a fingerprinted file."""
    if not isinstance(mark, dict):
        return ""
    return f", fingerprinted for {mark['licence']}: {mark['positions']} weights in {mark['tensors']} tensors"


@main.command()
@click.argument("path", type=click.Path())
@json_option
@fail_closed
def inspect(path: str, as_json: bool) -> None:
    """Show what a sealed file or directory is, without any key."""
    require_inputs(path)
    reports = operations.inspect(path)

    def human() -> None:
        for r in reports:
            out.print(f"[bold]{r.file}[/]: {r.kind} {r.format}, model {r.model_id} v{r.model_version}")
            out.print(
                f"  payload {r.payload_bytes} bytes in {r.segments} segments of {r.segment_size}; "
                f"index {'hidden' if r.hidden_index else 'public'}; signer {r.signer or 'none'}"
            )
            out.print(
                "  recipients: " + ", ".join(s["type"] + (f" ({s['kid']})" if "kid" in s else "") for s in r.recipients)
            )
            if r.tensors is not None:
                table = Table("tensor", "dtype", "shape")
                for t in r.tensors[:50]:
                    table.add_row(t.name, t.dtype, str(t.shape))
                out.print(table)
                if len(r.tensors) > 50:
                    out.print(f"  ... {len(r.tensors) - 50} more tensors")

    docs = [inspect_json(r) for r in reports]
    emit(as_json, docs if len(docs) > 1 or Path(path).is_dir() else docs[0], human)


def inspect_json(info: operations.ArtifactInfo) -> dict[str, Any]:
    """``inspect --json`` for one file: the header's fields; group, metadata and tensors only where present."""
    return {k: v for k, v in dataclasses.asdict(info).items() if v is not None or k == "signer"}


@main.command(reads=[*IDENTITY_VARS, "MODELSEAL_THREADS", IDENTITY_VAR])
@click.argument("path", type=click.Path())
@identity_option
@passphrase_option
@click.option(
    "--trusted-signer",
    "signers",
    multiple=True,
    metavar="ed25519:...|FILE",
    help="Require a valid signature from this publisher key (repeatable).",
)
@json_option
@fail_closed
def verify(
    path: str, identities: tuple[str, ...], passphrase_env: str | None, signers: tuple[str, ...], as_json: bool
) -> None:
    """Authenticate every byte of a sealed file or directory; exit 0 if authentic, 1 if not."""
    require_inputs(path)
    identity = command_identity(identities, passphrase_env, optional=bool(signers))
    with byte_progress("verifying", operations.payload_bytes(path), not as_json) as advance:
        results = operations.verify(path, identity, list(signers), advance)
    reports = [
        {
            "file": r.file,
            "payload": "authentic" if r.payload_checked else "not checked (no identity)",
            "signature": f"valid, by {r.signer}" if r.signer is not None else "not checked",
        }
        for r in results
    ]
    emit(
        as_json,
        {"ok": True, "files": reports},
        [f"OK {r['file']}: payload {r['payload']}; signature {r['signature']}" for r in reports],
    )


@main.command(
    name="open",
    reads=[*IDENTITY_VARS, "MODELSEAL_THREADS", IDENTITY_VAR],
    writes=[("OUTPUT", "The plaintext file, or a directory of them: files mode 0600, directories 0700.")],
)
@click.argument("path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Plaintext output file or directory.")
@identity_option
@passphrase_option
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@json_option
@fail_closed
def open_cmd(
    path: str, output: str, identities: tuple[str, ...], passphrase_env: str | None, force: bool, as_json: bool
) -> None:
    """Decrypt a sealed artifact to plaintext files (the owner's explicit, on-disk decrypt)."""
    require_inputs(path)
    identity = command_identity(identities, passphrase_env)
    with byte_progress("opening", operations.payload_bytes(path), not as_json) as advance:
        written = operations.open_to_disk(path, output, identity, force=force, progress=advance)
    emit(as_json, {"written": written}, [f"wrote {w}" for w in written])


@main.command(
    reads=[*IDENTITY_VARS, *KEYSERVER_RECIPIENT_VARS, IDENTITY_VAR],
    writes=[
        (
            "PATH",
            "Each sealed file's header, in place; a header that outgrew its reserved space moves the "
            "weights behind it (the file is rewritten atomically, never re-encrypted).",
        )
    ],
)
@click.argument("path", type=click.Path())
@identity_option
@passphrase_option
@click.option("--add-recipient", "add", multiple=True, metavar="RECIPIENT", help="Recipient to add (repeatable).")
@click.option(
    "--remove-recipient", "remove", multiple=True, metavar="RECIPIENT", help="Recipient to remove (repeatable)."
)
@json_option
@fail_closed
def rekey(
    path: str,
    identities: tuple[str, ...],
    passphrase_env: str | None,
    add: tuple[str, ...],
    remove: tuple[str, ...],
    as_json: bool,
) -> None:
    """Add or remove recipients; rewrites headers only, never the encrypted weights."""
    require_inputs(path)
    identity = command_identity(identities, passphrase_env)
    results = operations.rekey(path, identity, add, remove)
    emit(
        as_json,
        [{**dataclasses.asdict(r), "rewritten": r.rewritten.value} for r in results],
        [f"{r.file}: +{r.added} -{r.removed} -> {r.recipients} recipients ({r.rewritten.value})" for r in results],
    )


@main.command(
    writes=[
        (
            "WORKDIR",
            "owner/ (the plaintext model, key-service state with its keys at 0600) and host/ (the sealed model "
            "repository, the host's certificate and key, logs).",
        )
    ]
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="demo",
    show_default=True,
    help="Where the demo's owner and host directories go (the host side holds only sealed files).",
)
@json_option
@fail_closed
def demo(workdir: str, as_json: bool) -> None:
    """End to end on embedded defaults: seal a model to a key service, serve it, infer, revoke."""
    from modelseal.cli.demo import run_demo

    report = run_demo(Path(workdir), log=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def _register_service_commands() -> None:
    from modelseal.cli.agent import agent
    from modelseal.cli.attest import attest
    from modelseal.cli.keyserver import keyserver
    from modelseal.cli.pki import pki_group
    from modelseal.cli.triton import triton_repo

    main.add_command(keyserver, "keyserver")
    main.add_command(agent, "agent")
    main.add_command(pki_group, "pki")
    main.add_command(attest, "attest")
    main.add_command(triton_repo, "triton-repo")
    from modelseal.cli.trace import fingerprint_group, trace

    main.add_command(trace, "trace")
    main.add_command(fingerprint_group, "fingerprint")
    try:
        from modelseal.cli.serve import bench, serve
    except ImportError:  # pragma: no cover (click is core; the serve extra is imported lazily)
        return
    main.add_command(serve, "serve")
    main.add_command(bench, "bench")


_register_service_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
