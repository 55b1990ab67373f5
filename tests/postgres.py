"""A throwaway PostgreSQL server for tests: its own data folder, a free loopback port, one database; gone at the end.

`postgres_server()` runs the server binaries found by `server_bin()` (Debian's `/usr/lib/postgresql/N/bin`,
else `initdb`/`pg_ctl` on the PATH): `initdb` into a temporary folder, `pg_ctl start` on 127.0.0.1 with the
unix socket in that folder (trust authentication: nothing but this machine can reach it), `createdb`; at
the end `pg_ctl stop -m fast` and the folder is removed. `initdb` refuses to run as root, so as root every
command runs as the `postgres` user (`runuser`), who owns the folder. `missing()` says why it cannot run here.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"  # who runs the server when the tests run as root


def server_bin() -> Path | None:
    "The folder of the newest PostgreSQL server binaries, or None."
    debian = sorted((Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")),
                    key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    if debian: return debian[-1]
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl and (Path(pg_ctl).parent / "initdb").exists() else None


def missing() -> str | None:
    "Why no PostgreSQL test can run here, or None if one can."
    if server_bin() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on the PATH: apt-get install postgresql"
    try: import psycopg  # noqa: F401
    except ImportError: return "the psycopg driver is not installed: pip install 'movierec[postgres]'"
    if os.geteuid() == 0:
        try: pwd.getpwnam(SERVER_USER)
        except KeyError: return f"running as root, and there is no {SERVER_USER!r} user to own the server (initdb refuses root)"
        if not shutil.which("runuser"): return f"running as root without runuser to start the server as {SERVER_USER!r}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server(db: str = "movierec", user: str = "movierec"):
    "Yield the SQLAlchemy URL (`postgresql+psycopg://...`) of database `db` on a new server of its own; stop and remove it at the end."
    if reason := missing(): raise RuntimeError(reason)
    bin_dir, port = server_bin(), free_port()
    root = Path(tempfile.mkdtemp(prefix="movierec-pg-"))
    as_user = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam(SERVER_USER)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", SERVER_USER, "--"]
    data, server_log = root / "data", root / "server.log"

    def run(*cmd):
        try: subprocess.run(as_user + [str(c) for c in cmd], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as e:
            log = server_log.read_text()[-2000:] if server_log.exists() else ""
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({e.returncode}): {e.stderr or e.stdout}\n{log}") from None

    try:
        run(bin_dir / "initdb", "-D", data, "-U", user, "--auth=trust", "-E", "UTF8", "--no-instructions")
        run(bin_dir / "pg_ctl", "-D", data, "-l", server_log, "-w", "-t", "60",
            "-o", f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off", "start")
        try:
            run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", user, db)
            yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/{db}"
        finally:
            run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
