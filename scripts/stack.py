"""The team stack on one machine: PostgreSQL, an S3 object store (SeaweedFS) and an MLflow
server that keeps its runs in the first and its artifacts in the second.

    python scripts/stack.py up [SERVICE...]      # start what is not running (make stack)
    python scripts/stack.py down [SERVICE...]    # stop, newest first (make stack-down)
    python scripts/stack.py status               # each service's health; exit 1 unless all healthy
    python scripts/stack.py env                  # the lines a client exports (MLflow, make search)
    python scripts/stack.py remote [--repo DIR]  # the DVC remote `team` of a checkout: its credentials

Everything lives under the stack folder (`STACK_DIR`, default `.stack/` at the repository root,
ignored by git), kept across restarts: data, logs, pid files, the ports chosen at the first start
(`stack.json`) and the secrets generated then (`secrets/`, mode 0700, files 0600). Each service
runs in a process group of its own, listens on 127.0.0.1 only, and is stopped as a group.

Ports: `STACK_PG_PORT`, `STACK_S3_PORT`, `STACK_MLFLOW_PORT` (defaults 5433, 8333, 5050; 0 picks a
free one); the object store's internal ports are picked free at the first start. What a start
chose is recorded and reused, so the URLs a team exported stay true.

Clients need only `MLFLOW_TRACKING_URI`: the server proxies artifacts (`--artifacts-destination
s3://...`), so the S3 credentials stay on the server. DVC talks to the store directly, with
the credentials `remote` writes into `.dvc/config.local` (never committed).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORTS = {"postgres": 5433, "s3": 8333, "mlflow": 5050}
PORT_ENV = {"postgres": "STACK_PG_PORT", "s3": "STACK_S3_PORT", "mlflow": "STACK_MLFLOW_PORT"}
# The object store's internal ports (its master, volume and filer servers, and their gRPC twins).
S3_INTERNAL = ("s3_master", "s3_master_grpc", "s3_volume", "s3_volume_grpc", "s3_filer", "s3_filer_grpc", "s3_grpc")
DB_USER, DB_NAME = "minigpt", "mlflow"
# `make search`'s studies (OPTUNA_STORAGE): a database of their own, since Optuna and MLflow both
# keep their schema version in a table named alembic_version.
OPTUNA_DB = "optuna"
BUCKETS = {"mlflow": "minigpt-mlflow", "dvc": "minigpt-dvc"}
REGION = "us-east-1"  # SeaweedFS ignores it; boto3 wants one
SERVICES = ("postgres", "s3", "mlflow")  # start order; stopped in reverse
# Bounded waits (seconds): a first MLflow start also creates its schema in PostgreSQL (7-8 s in all
# here on an idle machine; a busy one takes several times longer).
READY_TIMEOUT = {"postgres": 60, "s3": 60, "mlflow": 180}


class StackError(Exception):
    """One line for the user; exit status 1."""


def log(message: str) -> None:
    print(f"stack: {message}", flush=True)


# --------------------------------------------------------------------------- state on disk


@dataclass(frozen=True)
class Stack:
    dir: Path

    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    @property
    def secrets_dir(self) -> Path:
        return self.dir / "secrets"

    def pid_file(self, service: str) -> Path:
        return self.dir / "run" / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    # -- ports -------------------------------------------------------------------------
    def ports(self) -> dict[str, int]:
        """The ports recorded at the first start, with explicit STACK_*_PORT settings applied
        (a changed setting is recorded again); missing ones chosen now and recorded."""
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        ports: dict[str, int] = dict(state.get("ports", {}))
        for service, env in PORT_ENV.items():
            wanted = os.environ.get(env)
            if wanted is not None:
                try:
                    value = int(wanted)
                except ValueError:
                    raise StackError(f"{env}={wanted!r}: expected a port number (0 picks a free one)") from None
                if not 0 <= value < 65536:
                    raise StackError(f"{env}={value}: expected a port number between 0 and 65535")
                if value or service not in ports:
                    ports[service] = value or free_port()
            ports.setdefault(service, DEFAULT_PORTS[service])
        for name in S3_INTERNAL:
            ports.setdefault(name, free_port())
        if ports != state.get("ports"):
            write_private(self.state_file, json.dumps({**state, "ports": ports}, indent=2) + "\n", mode=0o644)
        return ports

    def recorded_ports(self) -> dict[str, int]:
        if not self.state_file.exists():
            return {}
        return json.loads(self.state_file.read_text()).get("ports", {})

    # -- secrets -----------------------------------------------------------------------
    def secrets(self, create: bool = False) -> dict[str, str]:
        """The database password and the S3 key pair, generated by the first `up` (`create`)."""
        path = self.secrets_dir / "secrets.json"
        if path.exists():
            return json.loads(path.read_text())
        if not create:
            raise StackError(f"{path}: missing; the stack's secrets are made by its first `make stack`")
        alphabet = string.ascii_uppercase + string.digits
        values = {"postgres_password": secrets.token_urlsafe(24),
                  "s3_access_key": "".join(secrets.choice(alphabet) for _ in range(20)),
                  "s3_secret_key": secrets.token_urlsafe(30)}
        write_private(path, json.dumps(values, indent=2) + "\n")
        return values


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write atomically, the file created with `mode` (never readable by others in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- processes


def running_pid(stack: Stack, service: str) -> int | None:
    """The recorded process of `service` if it is still that process (its start time guards
    against a reused pid), else None."""
    path = stack.pid_file(service)
    try:
        pid_text, started = path.read_text().split()
        process = psutil.Process(int(pid_text))
        if f"{process.create_time():.2f}" == started and process.status() != psutil.STATUS_ZOMBIE:
            return process.pid
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def spawn(stack: Stack, service: str, argv: list[str], env: dict[str, str], *, cwd: Path,
          user: str | None = None) -> subprocess.Popen:
    """Start `argv` in a session (and process group) of its own, its output in the service's
    log, and record its pid with its start time."""
    log_path = stack.log_file(service)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        out.flush()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True, **as_user(user))
    started = psutil.Process(process.pid).create_time()
    stack.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
    stack.pid_file(service).write_text(f"{process.pid} {started:.2f}\n")
    return process


def as_user(user: str | None) -> dict:
    """subprocess arguments that run a child as `user` (its group, none of ours), or as us."""
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if user else {}


def stop_group(pid: int, sig: signal.Signals, grace: float) -> None:
    """Signal the process group led by `pid`; what is left after `grace` seconds gets SIGKILL."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and group_alive(pid):
        time.sleep(0.2)
    if group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while group_alive(pid):
            time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def wait_ready(service: str, process: subprocess.Popen, log_path: Path, check: Callable[[], str | None]) -> float:
    """Poll `check` (None when ready, else why not) until it passes; fail with the log's tail
    when the process exits or the bounded wait is over. Seconds it took."""
    started = time.time()
    why = "not started"
    while time.time() - started < READY_TIMEOUT[service]:
        why = check()
        if why is None:
            return time.time() - started
        if process.poll() is not None:
            raise StackError(f"{service}: exited with status {process.returncode} while starting ({why}); "
                             f"see {log_path}:\n{tail(log_path)}")
        time.sleep(0.3)
    stop_group(process.pid, signal.SIGKILL, grace=0)
    raise StackError(f"{service}: not ready after {READY_TIMEOUT[service]} s ({why}); see {log_path}")


def tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def tool(name: str) -> str:
    """A console script of this interpreter's environment (weed, mlflow, dvc), else PATH's."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: run `make setup` (it installs the team extra)")
    return found


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    """Debian's server binaries (the `postgresql` package), newest version first; or STACK_PG_BIN."""
    configured = os.environ.get("STACK_PG_BIN")
    candidates = [Path(configured)] if configured else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    raise StackError("PostgreSQL server not found (no initdb under /usr/lib/postgresql/*/bin): "
                     "`apt-get install postgresql`, or set STACK_PG_BIN to the folder holding initdb")


def postgres_user() -> str | None:
    """The unprivileged user the server runs as: initdb and postgres refuse root, so root hands
    them to Debian's `postgres` user; anyone else runs them as themselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root, PostgreSQL needs an unprivileged user, and there is no `postgres` "
                         "user (the Debian package creates it: `apt-get install postgresql`)") from None
    return "postgres"


def check_traversable(folder: Path, user: str) -> None:
    """Every folder above the data must let `user` through, or initdb fails obscurely."""
    for parent in [*reversed(folder.resolve().parents)]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise StackError(f"{parent}: the `{user}` user that PostgreSQL runs as cannot enter it (mode "
                             f"{oct(mode & 0o777)}); put the stack elsewhere with STACK_DIR or `chmod o+x {parent}`")


def db_connect(stack: Stack, port: int, dbname: str = DB_NAME):
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=port, user=DB_USER, password=stack.secrets()["postgres_password"],
                           dbname=dbname, connect_timeout=3, autocommit=True)


def postgres_health(stack: Stack, port: int, dbname: str = DB_NAME) -> str | None:
    import psycopg

    try:
        with db_connect(stack, port, dbname) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.OperationalError as err:
        message = str(err).strip().splitlines()[-1]
        if "password authentication failed" in message:
            return (f"it refuses the password in {stack.secrets_dir / 'secrets.json'} "
                    f"(postgres_password) for user {DB_USER}")
        return message


def start_postgres(stack: Stack, port: int) -> str:
    binaries, user = postgres_bin(), postgres_user()
    data = stack.dir / "postgres"
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        if user:
            check_traversable(stack.dir, user)
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        password_file = stack.dir / "postgres.pw"  # for initdb only, then gone
        write_private(password_file, stack.secrets()["postgres_password"] + "\n")
        if user:
            owner = pwd.getpwnam(user)
            for path in (data, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        try:
            proc = subprocess.run(
                [str(binaries / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={password_file}",
                 "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"],
                cwd=stack.dir, capture_output=True, text=True, timeout=120,
                **as_user(user))
        finally:
            password_file.unlink(missing_ok=True)
        if proc.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)  # a half-made cluster would be trusted next time
            raise StackError(f"postgres: initdb failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    # TCP on loopback only, no Unix socket (nothing to clash with a system server's /var/run).
    process = spawn(stack, "postgres", [str(binaries / "postgres"), "-D", str(data), "-p", str(port),
                                        "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
                    env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}, cwd=stack.dir, user=user)
    took = wait_ready("postgres", process, stack.log_file("postgres"),
                      lambda: postgres_health(stack, port, dbname="postgres"))
    with db_connect(stack, port, "postgres") as conn:
        for name in (DB_NAME, OPTUNA_DB):
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {name} OWNER {DB_USER}")
    write_pgpass(stack, port)
    return f"{'initialised and ' if fresh else ''}started in {took:.1f} s"


# --------------------------------------------------------------------------- object store


def s3_client(stack: Stack, port: int):
    import boto3
    from botocore.config import Config

    keys = stack.secrets()
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name=REGION,
                        aws_access_key_id=keys["s3_access_key"],
                        aws_secret_access_key=keys["s3_secret_key"],
                        config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))


def s3_health(stack: Stack, port: int, buckets: bool = True) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        names = {b["Name"] for b in s3_client(stack, port).list_buckets().get("Buckets", [])}
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):
            return f"it refuses the key pair in {stack.secrets_dir / 'secrets.json'} (s3_access_key/s3_secret_key): {code}"
        return f"{code or err}"
    except BotoCoreError as err:
        return str(err)
    missing = sorted(set(BUCKETS.values()) - names) if buckets else []
    return f"bucket(s) missing: {', '.join(missing)}" if missing else None


def start_s3(stack: Stack, ports: dict[str, int]) -> str:
    keys = stack.secrets()
    identities = {"identities": [{"name": "minigpt", "credentials": [
        {"accessKey": keys["s3_access_key"], "secretKey": keys["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    config = stack.secrets_dir / "s3-identities.json"
    write_private(config, json.dumps(identities, indent=2) + "\n")
    data = stack.dir / "s3"
    data.mkdir(parents=True, exist_ok=True)
    argv = [tool("weed"), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['s3_master']}", f"-master.port.grpc={ports['s3_master_grpc']}",
            f"-volume.port={ports['s3_volume']}", f"-volume.port.grpc={ports['s3_volume_grpc']}",
            "-filer", f"-filer.port={ports['s3_filer']}", f"-filer.port.grpc={ports['s3_filer_grpc']}",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # gateways we do not use: no more ports
            "-master.telemetry=false",  # nothing phones home
            # Small volumes, grown on demand: the default 30 GB preallocation suits no laptop.
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s"]
    process = spawn(stack, "s3", argv, env={"PATH": os.environ.get("PATH", "")}, cwd=data)
    took = wait_ready("s3", process, stack.log_file("s3"), lambda: s3_health(stack, ports["s3"], buckets=False))
    client = s3_client(stack, ports["s3"])
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS.values():
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
    return f"started in {took:.1f} s"


# --------------------------------------------------------------------------- MLflow


def mlflow_env(stack: Stack, ports: dict[str, int]) -> dict[str, str]:
    """The server's environment: the database password through a libpq password file and the
    S3 key pair through an AWS credentials file (both 0600), not on the command line."""
    keys = stack.secrets()
    pgpass = write_pgpass(stack, ports["postgres"])
    credentials = stack.secrets_dir / "aws-credentials"
    write_private(credentials, f"[default]\naws_access_key_id = {keys['s3_access_key']}\n"
                               f"aws_secret_access_key = {keys['s3_secret_key']}\n")
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return {**keep, "PGPASSFILE": str(pgpass), "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_CONFIG_FILE": os.devnull, "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait on a cloud metadata endpoint
            "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def write_pgpass(stack: Stack, port: int) -> Path:
    """A libpq password file (0600) for the stack's databases: what the MLflow server and
    `make search` (through PGPASSFILE) log in with, so no URL carries the password."""
    pgpass = stack.secrets_dir / "pgpass"
    write_private(pgpass, f"127.0.0.1:{port}:*:{DB_USER}:{stack.secrets()['postgres_password']}\n")
    return pgpass


def client_exports(stack: Stack, ports: dict[str, int]) -> list[str]:
    """The lines a client exports: the tracking server, and the study database of `make search`."""
    return [f"export MLFLOW_TRACKING_URI={tracking_url(ports)}",
            f"export OPTUNA_STORAGE=postgresql://{DB_USER}@127.0.0.1:{ports['postgres']}/{OPTUNA_DB} "
            f"PGPASSFILE={stack.secrets_dir / 'pgpass'}"]


def tracking_url(ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['mlflow']}"


def mlflow_health(ports: dict[str, int]) -> str | None:
    try:
        with urllib.request.urlopen(f"{tracking_url(ports)}/health", timeout=3) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as err:
        return str(getattr(err, "reason", err))


def start_mlflow(stack: Stack, ports: dict[str, int]) -> str:
    # psycopg 3 (`postgresql+psycopg`): maintained, binary wheels, and SQLAlchemy 2's default
    # PostgreSQL driver; psycopg2 is in maintenance mode. Two workers for two cores.
    argv = [tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
            "--backend-store-uri", f"postgresql+psycopg://{DB_USER}@127.0.0.1:{ports['postgres']}/{DB_NAME}",
            "--artifacts-destination", f"s3://{BUCKETS['mlflow']}", "--workers", "2"]
    process = spawn(stack, "mlflow", argv, env=mlflow_env(stack, ports), cwd=stack.dir)
    took = wait_ready("mlflow", process, stack.log_file("mlflow"), lambda: mlflow_health(ports))
    return f"started in {took:.1f} s"


# --------------------------------------------------------------------------- commands


# How each service is stopped: a signal, then SIGKILL for what is left after so many seconds.
STOP = {"postgres": (signal.SIGINT, 30),  # PostgreSQL's "fast" shutdown: clients cut, data flushed
        # SeaweedFS's volume and master servers stop within a second; its filer then waits ~15 s
        # for the S3 gateway's metadata stream to end (measured), with every write already on disk.
        "s3": (signal.SIGINT, 2),
        "mlflow": (signal.SIGTERM, 20)}


def health(stack: Stack, service: str, ports: dict[str, int]) -> str | None:
    if service == "postgres":
        return postgres_health(stack, ports["postgres"])
    if service == "s3":
        return s3_health(stack, ports["s3"])
    return mlflow_health(ports)


def address(service: str, ports: dict[str, int]) -> str:
    return f"127.0.0.1:{ports[service]}" if service == "postgres" else f"http://127.0.0.1:{ports[service]}"


def up(stack: Stack, services: list[str]) -> None:
    stack.dir.mkdir(parents=True, exist_ok=True)
    stack.secrets_dir.mkdir(mode=0o700, exist_ok=True)
    stack.secrets_dir.chmod(0o700)
    if os.geteuid() == 0:
        stack.dir.chmod(0o711)  # the postgres user passes through to its data folder, lists nothing
    ports = stack.ports()
    stack.secrets(create=True)
    to_start = []
    for service in services:
        pid = running_pid(stack, service)
        if pid:
            log(f"{service}: already running (pid {pid}, {address(service, ports)}); not started again")
        else:
            to_start.append(service)
    # Every port checked before anything starts: a clash starts nothing.
    for service in to_start:
        for name in [service, *(S3_INTERNAL if service == "s3" else ())]:
            if port_taken(ports[name]):
                setting = PORT_ENV.get(name, f"ports.{name} in {stack.state_file}")
                raise StackError(f"{service}: port {ports[name]} on 127.0.0.1 is in use by another process; "
                                 f"free it or choose another ({setting}); nothing was started")
    starters = {"postgres": lambda: start_postgres(stack, ports["postgres"]),
                "s3": lambda: start_s3(stack, ports), "mlflow": lambda: start_mlflow(stack, ports)}
    for service in to_start:
        for needed in SERVICES[:SERVICES.index(service)]:
            if needed not in to_start and (why := health(stack, needed, ports)):
                raise StackError(f"{service}: needs {needed}, which is not healthy ({why}); "
                                 f"`make stack` starts it")
        log(f"{service}: {starters[service]()} ({address(service, ports)})")
    if stack.dir.resolve() == (ROOT / ".stack").resolve():
        configure_remote(stack, ROOT)
    print("\n" + "\n".join(client_exports(stack, ports)))
    print(f"MLflow UI: {tracking_url(ports)}")
    print(f"DVC remote: dvc push -r team / dvc pull -r team (S3 at http://127.0.0.1:{ports['s3']}, "
          f"bucket {BUCKETS['dvc']})")


def down(stack: Stack, services: list[str]) -> None:
    for service in reversed(SERVICES):
        if service not in services:
            continue
        pid = running_pid(stack, service)
        if pid is None:
            log(f"{service}: not running")
        else:
            started = time.time()
            stop_group(pid, *STOP[service])
            log(f"{service}: stopped (pid {pid}, {time.time() - started:.1f} s)")
        stack.pid_file(service).unlink(missing_ok=True)


def status(stack: Stack) -> int:
    ports = stack.recorded_ports()
    if not ports:
        log(f"no stack in {stack.dir} yet: `make stack` starts one")
        return 1
    healthy = 0
    for service in SERVICES:
        pid = running_pid(stack, service)
        why = health(stack, service, ports) if pid else "not running"
        state = "healthy" if why is None else f"unhealthy: {why}"
        print(f"{service:9s} {'pid ' + str(pid) if pid else '-':11s} {address(service, ports):24s} {state}")
        healthy += why is None
    return 0 if healthy == len(SERVICES) else 1


def configure_remote(stack: Stack, repo: Path) -> None:
    """The `team` remote's credentials (and its endpoint, where this stack's port is not the
    committed default) in `repo`'s .dvc/config.local, which git never sees."""
    ports, keys = stack.ports(), stack.secrets()
    settings = {"access_key_id": keys["s3_access_key"], "secret_access_key": keys["s3_secret_key"]}
    if ports["s3"] != DEFAULT_PORTS["s3"]:
        settings["endpointurl"] = f"http://127.0.0.1:{ports['s3']}"
    for key, value in settings.items():
        proc = subprocess.run([tool("dvc"), "remote", "modify", "--local", "team", key, value], cwd=repo,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise StackError(f"{repo}: dvc remote modify --local team {key}: {proc.stderr.strip()}")
    local = repo / ".dvc" / "config.local"
    local.chmod(0o600)
    log(f"DVC remote `team` of {repo}: credentials in {local}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/stack.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("STACK_DIR") or ROOT / ".stack"),
                        help="the stack folder (STACK_DIR; default .stack/ at the repository root)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down"):
        cmd = sub.add_parser(name)
        cmd.add_argument("services", nargs="*", metavar="SERVICE", help=f"some of {', '.join(SERVICES)} (default: all)")
    sub.add_parser("status")
    sub.add_parser("env")
    remote = sub.add_parser("remote")
    remote.add_argument("--repo", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    stack = Stack(args.dir.resolve())
    services = list(getattr(args, "services", None) or SERVICES)
    try:
        if unknown := [s for s in services if s not in SERVICES]:
            raise StackError(f"unknown service {unknown[0]!r}: expected some of {', '.join(SERVICES)}")
        if args.command == "up":
            up(stack, services)
        elif args.command == "down":
            down(stack, services)
        elif args.command == "status":
            return status(stack)
        elif args.command == "env":
            ports = stack.recorded_ports()
            if not ports:
                raise StackError(f"no stack in {stack.dir} yet: `make stack` starts one")
            print("\n".join(client_exports(stack, ports)))
        elif args.command == "remote":
            if not stack.recorded_ports():
                raise StackError(f"no stack in {stack.dir} yet: `make stack` starts one")
            configure_remote(stack, args.repo.resolve())
    except StackError as err:
        print(f"stack: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
