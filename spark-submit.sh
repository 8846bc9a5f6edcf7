#!/usr/bin/env bash
# Submit one mf-spark job with spark-submit, the same way on local, standalone, YARN and Kubernetes.
#
#   ./spark-submit.sh [spark-submit options] jobs/<job>.py [job arguments]
#   ./spark-submit.sh --zip-only      # only build dist/mf_spark.zip (for schedulers that call spark-submit)
#   ./spark-submit.sh jobs/nightly.py --config conf/local.toml --date 2011-12-09 --set train.rank=16
#   ./spark-submit.sh --master spark://10.0.0.5:7077 --conf spark.executor.memory=4g \
#       jobs/nightly.py --config conf/cluster.toml --date 2011-12-09
#
# What it does (docs/operations.md has the details and one example per cluster manager):
#   - packs mf_spark/ into a zip (spark-submit silently ignores a .whl in --py-files) with the git
#     commit stamped in, dist/mf_spark-<content hash>.zip, and ships it with --py-files;
#   - defaults --master to local[*] when no master is given;
#   - sets SPARK_CONF_DIR=<repo>/conf (spark-defaults.conf, log4j2.properties) unless already set;
#   - MF_SPARK_VENV_ARCHIVE=env.tar.gz (built with venv-pack) ships a packed virtual env for
#     executors that lack numpy/pyarrow: --archives env.tar.gz#environment, executors run
#     ./environment/bin/python;
#   - exits with the job's exit code (see mf_spark/errors.py).
set -euo pipefail

# Resolved through links: called via a link in ~/bin, the link's own directory has no mf_spark/ to zip
# and no conf/, and the job would run without the project's code on the executors.
REPO_DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
if [[ ! -f "$REPO_DIR/mf_spark/__init__.py" ]]; then
    echo "spark-submit.sh: no mf_spark/ package next to this script in $REPO_DIR; run the script of an mf-spark checkout" >&2
    exit 2
fi

# usage [CODE]: asked-for help (-h, --help: CODE 0) is the whole header comment on stdout, for
# "| less"; a usage error (CODE 2) is only the usage lines, on stderr.
usage() {
    local code="${1:-2}"
    if [[ "$code" == 0 ]]; then
        sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    else
        sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    fi
    exit "$code"
}

# needs_value "$@": the option in $1 takes a value (the next argument); without one it is a usage
# error here, before anything is built or started, not bash's "unbound variable" (set -u) and exit 1.
needs_value() {
    if [[ $# -lt 2 ]]; then
        echo "spark-submit.sh: $1 needs a value" >&2
        exit 2
    fi
}

zip_only=false
show_version=false
if [[ "${1:-}" == --zip-only ]]; then
    zip_only=true
    shift
fi

# Split the arguments: spark-submit options come before the job file, job arguments after it.
spark_opts=()
job_file=""
master=""
deploy_mode="client"
py_files=""
archives=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --verbose|-v|--supervise|--load-spark-defaults)
            spark_opts+=("$1"); shift ;;
        --help|-h)
            usage 0 ;;
        --version)
            show_version=true; shift ;;
        --master) needs_value "$@"; master="$2"; shift 2 ;;
        --master=*) master="${1#--master=}"; shift ;;
        --deploy-mode) needs_value "$@"; deploy_mode="$2"; spark_opts+=("$1" "$2"); shift 2 ;;
        --deploy-mode=*) deploy_mode="${1#--deploy-mode=}"; spark_opts+=("$1"); shift ;;
        --py-files) needs_value "$@"; py_files="$2"; shift 2 ;;
        --py-files=*) py_files="${1#--py-files=}"; shift ;;
        --archives) needs_value "$@"; archives="$2"; shift 2 ;;
        --archives=*) archives="${1#--archives=}"; shift ;;
        --conf|-c)
            needs_value "$@"
            [[ "$2" == spark.submit.deployMode=* ]] && deploy_mode="${2#spark.submit.deployMode=}"
            spark_opts+=("$1" "$2"); shift 2 ;;
        --*=*) spark_opts+=("$1"); shift ;;
        -*) needs_value "$@"; spark_opts+=("$1" "$2"); shift 2 ;;
        *) job_file="$1"; shift; break ;;
    esac
done
job_args=("$@")

if [[ -z "$job_file" && "$zip_only" == false && "$show_version" == false ]]; then
    echo "spark-submit.sh: no job file given (e.g. jobs/nightly.py)" >&2
    usage
fi
if [[ "$zip_only" == false && "$show_version" == false && "$job_file" != *://* && ! -f "$job_file" ]]; then
    echo "spark-submit.sh: job file not found: $job_file (run from the repository root, or give its path)" >&2
    exit 2
fi

SPARK_SUBMIT="$(command -v spark-submit || true)"
if [[ -z "$SPARK_SUBMIT" && ( "$zip_only" == false || "$show_version" == true ) ]]; then
    cat >&2 <<EOF
spark-submit.sh: spark-submit not found on PATH.
  With the project's virtual env: make venv && PATH="$REPO_DIR/.venv/bin:\$PATH" ./spark-submit.sh ...
  (or 'source .venv/bin/activate'); with a Spark distribution: PATH="\$SPARK_HOME/bin:\$PATH".
EOF
    exit 127
fi
if [[ "$show_version" == true ]]; then
    exec "$SPARK_SUBMIT" --version
fi
PYTHON="$(command -v python3 || command -v python || true)"
if [[ -z "$PYTHON" ]]; then
    echo "spark-submit.sh: no python3 on PATH (needed to build dist/mf_spark.zip)" >&2
    exit 127
fi

# The zip is built in memory with fixed timestamps, so the same code gives the same bytes, and is
# written under a content-addressed name: a job keeps importing the code it started with even when
# the code (or the commit) changes and another submission rebuilds meanwhile. dist/mf_spark.zip is the
# same zip under a stable name, for schedulers that call spark-submit themselves (--zip-only).
git_commit="$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$git_commit" != unknown ]] && [[ -n "$(git -C "$REPO_DIR" status --porcelain -- mf_spark 2>/dev/null)" ]]; then
    git_commit="$git_commit-dirty"
fi
zip_path="$("$PYTHON" - "$REPO_DIR" "$git_commit" <<'EOF'
import hashlib, io, json, os, pathlib, sys, time, zipfile

repo, commit = pathlib.Path(sys.argv[1]), sys.argv[2]
dist = repo / "dist"
dist.mkdir(exist_ok=True)
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w") as zf:
    # Python sources only: the package opens no data files, and derby.log, spark-warehouse/ or an
    # editor's backup that a run left in the tree (ignored by git, so not marked -dirty) stay out.
    entries = [(p.relative_to(repo).as_posix(), p.read_bytes()) for p in sorted((repo / "mf_spark").rglob("*.py"))
               if p.is_file() and "__pycache__" not in p.parts]
    entries.append(("mf_spark/_build_info.json", (json.dumps({"git_commit": commit}) + "\n").encode()))
    for name, data in entries:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)
payload = buffer.getvalue()


def install(path):
    if path.exists() and path.read_bytes() == payload:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


snapshot = dist / f"mf_spark-{hashlib.sha256(payload).hexdigest()[:12]}.zip"
install(snapshot)
install(dist / "mf_spark.zip")
os.utime(snapshot)
for old in dist.glob("mf_spark-*.zip"):  # snapshots no submission has used for two days
    if old.stat().st_mtime < time.time() - 2 * 86400:
        old.unlink(missing_ok=True)
print(snapshot)
EOF
)"
if [[ "$zip_only" == true ]]; then
    echo "$REPO_DIR/dist/mf_spark.zip"
    exit 0
fi

py_files="${py_files:+$py_files,}$zip_path"
master="${master:-local[*]}"
export SPARK_CONF_DIR="${SPARK_CONF_DIR:-$REPO_DIR/conf}"

if [[ -n "${MF_SPARK_VENV_ARCHIVE:-}" ]]; then
    if [[ "$MF_SPARK_VENV_ARCHIVE" != *://* && ! -f "$MF_SPARK_VENV_ARCHIVE" ]]; then
        echo "spark-submit.sh: MF_SPARK_VENV_ARCHIVE=$MF_SPARK_VENV_ARCHIVE: file not found" >&2
        exit 2
    fi
    archives="${archives:+$archives,}$MF_SPARK_VENV_ARCHIVE#environment"
    spark_opts+=(--conf spark.pyspark.python=./environment/bin/python)
    if [[ "$deploy_mode" == client ]]; then
        # The driver runs here, where ./environment does not exist: it keeps this machine's Python.
        spark_opts+=(--conf "spark.pyspark.driver.python=${PYSPARK_DRIVER_PYTHON:-$PYTHON}")
    elif [[ "$master" == yarn* ]]; then
        spark_opts+=(--conf spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python)
    fi
fi

cmd=("$SPARK_SUBMIT" --master "$master" --py-files "$py_files")
[[ -n "$archives" ]] && cmd+=(--archives "$archives")
cmd+=("${spark_opts[@]+"${spark_opts[@]}"}" "$job_file" "${job_args[@]+"${job_args[@]}"}")

echo "spark-submit.sh: SPARK_CONF_DIR=$SPARK_CONF_DIR ${cmd[*]}" >&2
# exec: the job's exit code is ours, and a signal to this script reaches spark-submit directly.
exec "${cmd[@]}"
