#!/usr/bin/env bash
# Install aiwfd into a virtualenv, with its systemd units and configuration.
#
#   sudo scripts/install.sh                 # /opt/aiwfd/venv, /etc/aiwfd, units
#   scripts/install.sh --prefix /tmp/x --no-systemd   # a self-contained tree
#
# Layout ($PREFIX is empty by default):
#   $PREFIX/opt/aiwfd/venv                  python3 -m venv; `aiwfd` in bin/
#   $PREFIX/etc/aiwfd/aiwfd.env             from systemd/aiwfd.env.example (0640, kept)
#   $PREFIX/etc/aiwfd/agents.yaml           from config.example.yaml (0640, kept)
#   $PREFIX/etc/systemd/system/aiwfd.service, aiwfd@.service
#   $PREFIX/var/lib/aiwfd                   compiled artifacts (StateDirectory)
#
# Safe to run again: the venv is reused and the package reinstalled (that is
# how to upgrade), existing aiwfd.env and agents.yaml are never touched, the
# units are replaced.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh [--prefix DIR] [--source DIR] [--no-systemd]
                  [--system-site-packages] [--pip-args "ARGS"] [--python PYTHON]

  --prefix DIR            install below DIR instead of / (paths inside the
                          units are rewritten to match)
  --source DIR            the aiwfd source tree to install (default: the
                          repository that contains this script)
  --no-systemd            do not create the aiwfd user and group and do not run
                          `systemctl daemon-reload` (the unit files are still
                          written below the prefix)
  --system-site-packages  create the venv with access to the system's
                          site-packages (lets an offline install reuse them)
  --pip-args "ARGS"       extra arguments for `pip install`, word-split, e.g.
                          "--no-deps --no-build-isolation" or "--no-index
                          --find-links /srv/wheels"
  --python PYTHON         interpreter that creates the venv (default: python3)
  -h, --help              this text
EOF
}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=""
source_dir="$(dirname "$script_dir")"
with_systemd=1
site_packages=0
pip_args=""
python=python3

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory"; source_dir=$2; shift 2 ;;
        --source=*) source_dir=${1#*=}; shift ;;
        --no-systemd) with_systemd=0; shift ;;
        --system-site-packages) site_packages=1; shift ;;
        --pip-args) [ $# -ge 2 ] || die "--pip-args needs a value"; pip_args=$2; shift 2 ;;
        --pip-args=*) pip_args=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a value"; python=$2; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# ---- Check the arguments -------------------------------------------------
if [ -n "$prefix" ]; then
    mkdir -p "$prefix"
    prefix=$(cd "$prefix" && pwd -P)
    [ "$prefix" = / ] && prefix=""
fi
# The prefix ends up inside unit files and sed expressions: keep it plain.
case "$prefix" in
    *[!A-Za-z0-9._/+-]*) die "--prefix must be a plain path ([A-Za-z0-9._/+-]): $prefix" ;;
esac
[ -d "$source_dir" ] || die "source directory not found: $source_dir"
source_dir=$(cd "$source_dir" && pwd -P)
if [ ! -f "$source_dir/pyproject.toml" ] && [ ! -f "$source_dir/setup.py" ] && [ ! -f "$source_dir/setup.cfg" ]; then
    die "$source_dir is not a Python project (no pyproject.toml, setup.py or setup.cfg)"
fi
for f in systemd/aiwfd.service systemd/aiwfd@.service systemd/aiwfd.env.example; do
    [ -f "$source_dir/$f" ] || die "missing $source_dir/$f"
done
command -v "$python" >/dev/null 2>&1 || die "interpreter not found: $python"

is_root=0
[ "$(id -u)" -eq 0 ] && is_root=1

venv="$prefix/opt/aiwfd/venv"
etc="$prefix/etc/aiwfd"
unit_dir="$prefix/etc/systemd/system"
state="$prefix/var/lib/aiwfd"

# ---- 1. The system user --------------------------------------------------
have_user=0
if [ "$with_systemd" -eq 0 ]; then
    say "user: skipped (--no-systemd)"
elif [ "$is_root" -eq 0 ]; then
    say "user: skipped (not root; create the system user 'aiwfd' yourself)"
elif [ -n "$prefix" ]; then
    say "user: skipped (--prefix given; the units still name User=aiwfd)"
else
    if getent group aiwfd >/dev/null; then
        say "group aiwfd: exists"
    else
        groupadd --system aiwfd
        say "group aiwfd: created"
    fi
    if getent passwd aiwfd >/dev/null; then
        say "user aiwfd: exists"
    else
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        useradd --system --gid aiwfd --home-dir /var/lib/aiwfd --no-create-home \
            --shell "$nologin" --comment "aiwfd daemon" aiwfd
        say "user aiwfd: created"
    fi
fi
if [ "$is_root" -eq 1 ] && getent group aiwfd >/dev/null && getent passwd aiwfd >/dev/null; then
    have_user=1
fi

# ---- 2. The virtualenv and the package -----------------------------------
if [ -x "$venv/bin/python" ]; then
    say "venv: $venv exists, reusing it"
else
    mkdir -p "$(dirname "$venv")"
    venv_args=()
    [ "$site_packages" -eq 1 ] && venv_args+=(--system-site-packages)
    "$python" -m venv ${venv_args[@]+"${venv_args[@]}"} "$venv"
    say "venv: created $venv$([ "$site_packages" -eq 1 ] && echo " (--system-site-packages)")"
fi

# Build from a copy so that the source tree (maybe read-only, maybe a git
# checkout) gets no build/ or *.egg-info droppings.
build_dir=$(mktemp -d "${TMPDIR:-/tmp}/aiwfd-install.XXXXXX")
trap 'rm -rf "$build_dir"' EXIT
tar -C "$source_dir" \
    --exclude=.git --exclude=.venv --exclude=venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    -cf - . | tar -C "$build_dir" -xf -

# shellcheck disable=SC2206  # word splitting of --pip-args is the point
extra=($pip_args)
say "pip: installing $source_dir into $venv${pip_args:+ (pip args: $pip_args)}"
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    ${extra[@]+"${extra[@]}"} "$build_dir"
[ -x "$venv/bin/aiwfd" ] || die "pip finished but $venv/bin/aiwfd is missing"
version=$("$venv/bin/python" -c 'import aiwfd; print(getattr(aiwfd, "__version__", "?"))' 2>/dev/null || echo "?")
say "pip: installed aiwfd $version ($venv/bin/aiwfd)"

# ---- 3. Configuration ----------------------------------------------------
mkdir -p "$etc"
if [ "$have_user" -eq 1 ]; then
    chown root:aiwfd "$etc"
    chmod 0750 "$etc"
fi

# install_config SRC DEST: copy once, 0640, never overwrite.
install_config() {
    local src=$1 dest=$2
    if [ -e "$dest" ]; then
        say "config: $dest exists, left untouched"
        return
    fi
    if [ ! -f "$src" ]; then
        say "config: $src not found, $dest NOT created (write it yourself)"
        return
    fi
    # Create it 0640 from the start: it will hold secrets.
    (umask 0137 && cp "$src" "$dest")
    chmod 0640 "$dest"
    if [ "$have_user" -eq 1 ]; then
        chown root:aiwfd "$dest"
    fi
    say "config: created $dest (mode 0640) from ${src#"$source_dir"/}"
}
install_config "$source_dir/systemd/aiwfd.env.example" "$etc/aiwfd.env"
install_config "$source_dir/config.example.yaml" "$etc/agents.yaml"

# ---- 4. State directory --------------------------------------------------
mkdir -p "$state"
chmod 0750 "$state"
if [ "$have_user" -eq 1 ]; then
    chown aiwfd:aiwfd "$state"
fi
say "state: $state"

# ---- 5. Units ------------------------------------------------------------
mkdir -p "$unit_dir"
for unit in aiwfd.service aiwfd@.service; do
    dest="$unit_dir/$unit"
    if [ -n "$prefix" ]; then
        # Paths follow '=', a space or ':' in the units; the replacement
        # starts with $prefix, so later expressions cannot match it again.
        sed -e "s#\([[:space:]=:]\)/opt/aiwfd#\1$prefix/opt/aiwfd#g" \
            -e "s#\([[:space:]=:]\)/etc/aiwfd#\1$prefix/etc/aiwfd#g" \
            -e "s#\([[:space:]=:]\)/var/lib/aiwfd#\1$prefix/var/lib/aiwfd#g" \
            "$source_dir/systemd/$unit" > "$dest.tmp"
        if [ "$unit" = aiwfd@.service ]; then
            # systemd creates /var/lib/aiwfd/%i (StateDirectory=), but not
            # $prefix/var/lib/aiwfd/%i: open the parent, which exists.
            sed -i -e "s#^ReadWritePaths=$prefix/var/lib/aiwfd/%i\$#ReadWritePaths=$prefix/var/lib/aiwfd#" "$dest.tmp"
        fi
    else
        cp "$source_dir/systemd/$unit" "$dest.tmp"
    fi
    chmod 0644 "$dest.tmp"
    mv -f "$dest.tmp" "$dest"
    say "unit: $dest${prefix:+ (paths below $prefix)}"
done
case "$prefix" in
    /home/*|/root/*|/run/user/*)
        say "warning: the units use ProtectHome=yes, so the service cannot see $prefix" ;;
esac

# ---- 6. systemd ----------------------------------------------------------
if [ "$with_systemd" -eq 0 ]; then
    say "systemctl daemon-reload: skipped (--no-systemd)"
elif [ -n "$prefix" ]; then
    say "systemctl daemon-reload: skipped (--prefix given)"
elif [ "$is_root" -eq 0 ]; then
    say "systemctl daemon-reload: skipped (not root)"
elif [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; then
    say "systemctl daemon-reload: skipped (systemd is not running here)"
else
    systemctl daemon-reload
    say "systemctl daemon-reload: done"
fi

cat <<EOF
install.sh: done. Next:
  edit $etc/aiwfd.env (OPENAI_API_KEY, API_KEY) and $etc/agents.yaml
  $venv/bin/aiwfd validate -f $etc/agents.yaml
  systemctl enable --now aiwfd                       # one instance on PORT, or
  systemctl enable --now aiwfd@8081 aiwfd@8082 aiwfd@8083   # behind deploy/nginx/aiwfd.conf
EOF
