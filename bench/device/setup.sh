# Sourced first by every bench/device/*.sh run on the lent GPU machine (carry .dev312):
# unpacks the site archive into /tmp/site and puts console scripts next to its python3.
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .dev312/site312.tar.xz || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/platform
BIN=$(python3 -c 'import os,sys; print(os.path.dirname(sys.executable))')
for f in ray serve mlflow; do sed "1s|.*|#!$BIN/python3|" /tmp/site/bin/$f > $BIN/$f; chmod +x $BIN/$f; done
# the guard matters: multiprocessing's spawn re-imports the main script in every child
printf '#!%s/python3\nimport sys\nfrom raytron.cli import main\nif __name__ == "__main__":\n    sys.exit(main())\n' "$BIN" > $BIN/raytron
chmod +x $BIN/raytron
