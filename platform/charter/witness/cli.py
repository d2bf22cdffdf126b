"""`charter witness ...`: make a witness key, run a witness, show what it has cosigned."""

from __future__ import annotations

import os
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit.verify import CheckpointError, CosignerKey, Verifier
from charter.witness.server import Witness
from charter.witness.state import WitnessState


class WitnessConfigError(click.UsageError):
    pass


@click.group()
def witness() -> None:
    """A transparency-log witness (C2SP tlog-witness): cosigns only consistent extensions
    of the logs it knows. Run it away from the log: another namespace, team or site."""


@witness.command("keygen")
@click.option("--name", required=True, help="The witness's name, e.g. witness.example/w1.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(name: str, path: Path) -> None:
    """Make the witness's Ed25519 key (PKCS#8 PEM, mode 0600); print its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise WitnessConfigError(f"{path} exists: a key is never overwritten") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    click.echo(f"wrote {path}; the witness key (for CHARTER_AUDIT_WITNESSES and "
               f"charter-verify --witness-key): {CosignerKey.of(name, key.public_key())}")


@witness.command("serve")
@click.option("--name", envvar="CHARTER_WITNESS_NAME", required=True,
              help="The witness's name (its cosignature lines carry it). "
                   "[env CHARTER_WITNESS_NAME]")
@click.option("--key", "key_path", envvar="CHARTER_WITNESS_KEY", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Its private key (charter witness keygen). [env CHARTER_WITNESS_KEY]")
@click.option("--state", "state_path", envvar="CHARTER_WITNESS_STATE", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Its state file (SQLite), on storage of its own that survives restarts. "
                   "[env CHARTER_WITNESS_STATE]")
@click.option("--log", "logs", envvar="CHARTER_WITNESS_LOGS", multiple=True, required=True,
              help="A log it witnesses: ORIGIN=VERIFIER_KEY (as `charter audit keygen` "
                   "prints); repeat for more keys or logs. [env CHARTER_WITNESS_LOGS, "
                   "space-separated]")
@click.option("--bind", envvar="CHARTER_WITNESS_BIND", default="127.0.0.1:7380",
              show_default=True, help="[env CHARTER_WITNESS_BIND]")
@click.option("--threads", default=8, show_default=True, type=int)
def serve(name: str, key_path: Path, state_path: Path, logs: tuple[str, ...], bind: str,
          threads: int) -> None:
    """Serve POST /add-checkpoint (and GET /healthz) on BIND."""
    from gunicorn.app.base import BaseApplication

    the_witness = Witness(name, _load_key(key_path), _logs(logs), WitnessState(state_path))
    click.echo(f"witness {the_witness.verifier} on http://{bind}", err=True)

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for k, v in {"bind": bind, "workers": 1, "threads": threads,
                         "worker_class": "gthread", "timeout": 30, "keepalive": 5,
                         "accesslog": None}.items():
                self.cfg.set(k, v)

        def load(self):  # type: ignore[no-untyped-def]
            return the_witness.wsgi

    Server().run()


@witness.command("show")
@click.option("--state", "state_path", envvar="CHARTER_WITNESS_STATE", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("origin")
def show(state_path: Path, origin: str) -> None:
    """Print the latest checkpoint cosigned for ORIGIN, and the refused ones kept as
    evidence of the log's misbehaviour."""
    state = WitnessState(state_path)
    latest = state.latest(origin)
    click.echo(latest.note if latest else f"nothing cosigned for {origin}", nl=not latest)
    for received_at, reason, request in state.evidence(origin):
        click.echo(f"refused at {received_at} ({reason}): {len(request)} bytes kept")


def _load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise WitnessConfigError(f"--key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise WitnessConfigError(f"--key {path}: not an Ed25519 private key")
    return key


def _logs(entries: tuple[str, ...]) -> dict[str, list[Verifier]]:
    out: dict[str, list[Verifier]] = {}
    for entry in entries:
        for item in entry.split():
            origin, sep, vkey = item.partition("=")
            try:
                if not sep or not origin:
                    raise CheckpointError("expected ORIGIN=VERIFIER_KEY")
                out.setdefault(origin, []).append(Verifier.parse(vkey))
            except CheckpointError as exc:
                raise WitnessConfigError(f"--log {item[:80]!r}: {exc}") from None
    return out
