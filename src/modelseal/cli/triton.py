"""``modelseal triton-repo``: lay out a Triton model repository entry that serves a sealed model in memory
(docs/serving.md, "Inside Triton"). A thin shell over :func:`modelseal.triton.layout.lay_out`."""

from __future__ import annotations

from pathlib import Path

import click

from modelseal.cli.helptext import IDENTITY_VARS, Command
from modelseal.cli.kit import emit, fail_closed, json_option, require_inputs


@click.command(
    "triton-repo",
    cls=Command,
    reads=IDENTITY_VARS,
    writes=[("REPO/NAME/", "config.pbtxt, 1/model.py and a copy of the sealed file (still sealed); nothing "
                           "decrypted. Made whole or not at all.")],
)
@click.argument("sealed", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--repository", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The Triton model repository (created if missing).")  # fmt: skip
@click.option("-n", "--name", help="The model's name in Triton (default: the sealed file's name up to its first dot).")
@click.option("-i", "--identity", help="Identity used now to read the model's inputs and outputs (decrypted in "
              "memory, then wiped). Default: $MODELSEAL_IDENTITY, then $MODELSEAL_AGENT_SOCKET.")  # fmt: skip
@click.option("--serve-identity", help="How the model in Triton gets its key, written into config.pbtxt: "
              "agent:SOCKET, env:VAR or a key file (default: none, so Triton's environment decides).")  # fmt: skip
@click.option("--platform", type=click.Choice(["onnxruntime_onnx", "pytorch_libtorch"]),
              help="The model's framework (default: from the file name, .onnx.sealed or .pt/.safetensors.sealed).")
@click.option("--max-batch-size", type=click.IntRange(0, 65536),
              help="Triton's max_batch_size (default: 4 when every tensor has a variable first dimension, else 0).")
@click.option("--env-path", help="EXECUTION_ENV_PATH: the Python environment (with modelseal and the framework) "
              "the backend stub runs in (default: this one).")  # fmt: skip
@click.option("--key-check", "key_check_s", type=click.FloatRange(0, 86400), default=5.0, show_default=True,
              help="Seconds between asking the agent whether it still releases the key (0: never).")  # fmt: skip
@click.option("--entry-point", default="", help='A state dict\'s module:factory (module: a file beside the sealed '
              'file, copied into the model directory yourself).')  # fmt: skip
@click.option("--input", "inputs", multiple=True, metavar="NAME:TYPE:DIMS",
              help="Declare an input (repeatable; dims without the batch dimension, -1 variable), for a model "
              "that cannot tell its own (TorchScript without example_inputs).")  # fmt: skip
@click.option("--output", "outputs", multiple=True, metavar="NAME:TYPE:DIMS", help="Declare an output (repeatable).")
@click.option("--copy-model-py", is_flag=True, help="Write a copy of modelseal's model.py, not a one-line import.")
@json_option
@fail_closed
def triton_repo(
    sealed: Path, repository: Path, name: str | None, identity: str | None, serve_identity: str | None,
    platform: str | None, max_batch_size: int | None, env_path: str | None, key_check_s: float,
    entry_point: str, inputs: tuple[str, ...], outputs: tuple[str, ...], copy_model_py: bool, as_json: bool,
) -> None:  # fmt: skip
    """Lay out a Triton Python-backend model that serves SEALED, decrypted in memory only."""
    from modelseal.triton.layout import Layout, lay_out, tensor_option

    require_inputs(sealed)
    layout = Layout(sealed, repository, name or sealed.name.split(".")[0], platform or "", identity, serve_identity,
                    max_batch_size, key_check_s=key_check_s, entry_point=entry_point,
                    copy_model_py=copy_model_py)  # fmt: skip
    layout.inputs, layout.outputs = tuple(map(tensor_option, inputs)), tuple(map(tensor_option, outputs))
    if env_path:
        layout.env_path = env_path
    report = lay_out(layout)
    shapes = ", ".join(f"{t['name']} {t['datatype']} {t['dims']}" for t in report["inputs"])
    emit(as_json, report, [f"laid out {report['directory']} ({report['platform']}, max_batch_size "
                           f"{report['max_batch_size']}; inputs: {shapes})",
                           "load it with tritonserver --model-repository " + str(repository)])  # fmt: skip
