#!/usr/bin/env bash
# Submit one mf-spark job with spark-submit, the same way on local, standalone, YARN and Kubernetes.
#
#   ./spark-submit.sh [spark-submit options] jobs/<job>.py [job arguments]
#   ./spark-submit.sh jobs/nightly.py --config conf/local.toml --date 2011-12-09 --set train.rank=16
#   ./spark-submit.sh --master spark://10.0.0.5:7077 --conf spark.executor.memory=4g \
#       jobs/nightly.py --config conf/cluster.toml --date 2011-12-09
#
# What it does (docs/operations.md has the details and one example per cluster manager):
#   - packs mf_spark/ into dist/mf_spark.zip (a zip: spark-submit silently ignores a .whl in
#     --py-files) with the git commit stamped in, and ships it with --py-files;
#   - defaults --master to local[*] when no master is given;
#   - sets SPARK_CONF_DIR=<repo>/conf (spark-defaults.conf, log4j2.properties) unless already set;
#   - MF_SPARK_VENV_ARCHIVE=env.tar.gz (built with venv-pack) ships a packed virtual env for
#     executors that lack numpy/pyarrow: --archives env.tar.gz#environment, executors run
#     ./environment/bin/python;
#   - exits with the job's exit code (see mf_spark/errors.py).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

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
            usage ;;
        --master) master="$2"; shift 2 ;;
        --master=*) master="${1#--master=}"; shift ;;
        --deploy-mode) deploy_mode="$2"; spark_opts+=("$1" "$2"); shift 2 ;;
        --deploy-mode=*) deploy_mode="${1#--deploy-mode=}"; spark_opts+=("$1"); shift ;;
        --py-files) py_files="$2"; shift 2 ;;
        --py-files=*) py_files="${1#--py-files=}"; shift ;;
        --archives) archives="$2"; shift 2 ;;
        --archives=*) archives="${1#--archives=}"; shift ;;
        --conf|-c)
            [[ "$2" == spark.submit.deployMode=* ]] && deploy_mode="${2#spark.submit.deployMode=}"
            spark_opts+=("$1" "$2"); shift 2 ;;
        --*=*) spark_opts+=("$1"); shift ;;
        -*)
            [[ $# -ge 2 ]] || { echo "spark-submit.sh: option $1 needs a value" >&2; exit 2; }
            spark_opts+=("$1" "$2"); shift 2 ;;
        *) job_file="$1"; shift; break ;;
    esac
done
job_args=("$@")

if [[ -z "$job_file" ]]; then
    echo "spark-submit.sh: no job file given (e.g. jobs/nightly.py)" >&2
    usage
fi
if [[ ! -f "$job_file" ]]; then
    echo "spark-submit.sh: job file not found: $job_file (run from the repository root, or give its path)" >&2
    exit 2
fi

SPARK_SUBMIT="$(command -v spark-submit || true)"
if [[ -z "$SPARK_SUBMIT" ]]; then
    cat >&2 <<EOF
spark-submit.sh: spark-submit not found on PATH.
  With the project's virtual env: make venv && PATH="$REPO_DIR/.venv/bin:\$PATH" ./spark-submit.sh ...
  (or 'source .venv/bin/activate'); with a Spark distribution: PATH="\$SPARK_HOME/bin:\$PATH".
EOF
    exit 127
fi
PYTHON="$(command -v python3 || command -v python || true)"
if [[ -z "$PYTHON" ]]; then
    echo "spark-submit.sh: no python3 on PATH (needed to build dist/mf_spark.zip)" >&2
    exit 127
fi

# Build the zip under a temporary name and rename it into place, so concurrent submissions never
# ship a half-written file. The commit is stamped in because the driver may run far from this checkout.
mkdir -p "$REPO_DIR/dist"
zip_path="$REPO_DIR/dist/mf_spark.zip"
tmp_zip="$REPO_DIR/dist/.mf_spark.zip.$$"
git_commit="$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$git_commit" != unknown ]] && [[ -n "$(git -C "$REPO_DIR" status --porcelain -- mf_spark 2>/dev/null)" ]]; then
    git_commit="$git_commit-dirty"
fi
"$PYTHON" - "$REPO_DIR" "$tmp_zip" "$git_commit" <<'EOF'
import json, pathlib, sys, zipfile

repo, out, commit = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
    for path in sorted((repo / "mf_spark").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            zf.write(path, path.relative_to(repo).as_posix())
    zf.writestr("mf_spark/_build_info.json", json.dumps({"git_commit": commit}) + "\n")
EOF
mv -f "$tmp_zip" "$zip_path"

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
