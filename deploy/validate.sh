#!/usr/bin/env bash
# Validates the Kubernetes manifests without a cluster:
#   1. every YAML file under deploy/k8s/ (or the files given) against the
#      Kubernetes JSON schemas of each version in K8S_VERSIONS, strictly
#      (unknown fields are errors), with the PyPI package kubernetes-validate;
#      an unknown kind or apiVersion and a file with no resource are errors too;
#   2. the DB-less config held by each ConfigMap with `manifold validate`
#      (the binary in MANIFOLD_BIN, else the newer of target/release and
#      target/debug; skipped with a note when there is none);
#   3. that the manifests agree with each other: every key of a ConfigMap is
#      mounted by the Deployment that uses it, every Service's named
#      targetPort exists on the pods it selects, every Ingress backend is a
#      Service here with that port.
# Exit 0 when all pass; otherwise 1, naming each failed file.
#
#   deploy/validate.sh                       # everything under deploy/k8s
#   deploy/validate.sh /tmp/my-deployment.yaml
#   K8S_VERSIONS="1.30.0 1.37.0" deploy/validate.sh
#
# kubernetes-validate is installed on first use into a virtualenv under
# ~/.cache/manifold (VALIDATE_VENV to put it elsewhere), from PyPI.
set -euo pipefail
given=()
for a in "$@"; do given+=("$(realpath -- "$a")"); done   # before the cd below
cd "$(dirname "$0")/.."

KV_VERSION=1.37.0                         # kubernetes-validate; schemas up to Kubernetes 1.37
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}   # oldest supported (preStop sleep), newest known
VENV=${VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/manifold/kubernetes-validate-$KV_VERSION}

# Installed once, under a lock: several runs at a time (parallel tests) wait
# for the first one's install rather than race it.
if [[ ! -e "$VENV/.installed" ]]; then
  mkdir -p "$(dirname "$VENV")"
  exec 9>"$VENV.lock"
  flock 9
  if [[ ! -e "$VENV/.installed" ]]; then
    echo "installing kubernetes-validate $KV_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
    touch "$VENV/.installed"
  fi
  flock -u 9
  exec 9>&-
fi

if (( ${#given[@]} > 0 )); then
  files=("${given[@]}")
else
  mapfile -t files < <(find deploy/k8s -type f \( -name '*.yaml' -o -name '*.yml' \) | sort)
fi
(( ${#files[@]} > 0 )) || { echo "no manifests found"; exit 1; }

failed=()
fail() { failed+=("$1"); }
args=(--strict)
for v in $K8S_VERSIONS; do args+=(-k "$v"); done

# 1. Schemas. kubernetes-validate exits 0 on an unknown kind (a WARN line)
# and on a file without resources, so its output is read as well.
for f in "${files[@]}"; do
  if out=$("$VENV/bin/kubernetes-validate" "${args[@]}" "$f" 2>&1); then rc=0; else rc=$?; fi
  passed=$(grep -c '^INFO .* passed' <<<"$out" || true)
  problems=$(grep -v '^INFO ' <<<"$out" | sed '/^[[:space:]]*$/d' || true)
  if (( rc != 0 )) || [[ -n "$problems" ]] || (( passed == 0 )); then
    echo "FAIL $f"
    sed 's/^/    /' <<<"${problems:-no Kubernetes resource in the file}"
    fail "$f"
  else
    echo "ok   $f: schemas of Kubernetes ${K8S_VERSIONS// /, } ($(sed -n 's/^INFO .* for resource \([^ ]*\) .*/\1/p' <<<"$out" | sort -u | tr '\n' ' ' | sed 's/ $//'))"
  fi
done

# 2 and 3, in the venv's Python (it has PyYAML).
manifold_bin=${MANIFOLD_BIN:-}
if [[ -z "$manifold_bin" ]]; then
  for b in target/release/manifold target/debug/manifold; do
    [[ -x "$b" ]] && { [[ -z "$manifold_bin" || "$b" -nt "$manifold_bin" ]] && manifold_bin=$b; }
  done
fi
if ! cross=$(MANIFOLD_BIN="$manifold_bin" "$VENV/bin/python" - "${files[@]}" <<'PY'
import os, subprocess, sys, tempfile
import yaml

files = sys.argv[1:]
docs = []  # (file, resource)
for f in files:
    try:
        with open(f) as fh:
            docs += [(f, d) for d in yaml.safe_load_all(fh) if isinstance(d, dict)]
    except Exception as e:
        pass  # a parse error was already reported by the schema check
bad = set()

def name(d):
    return (d.get("metadata") or {}).get("name", "?")

def say(f, msg):
    print(f"FAIL {f}\n    {msg}")
    bad.add(f)

# 2. The config of each ConfigMap, as the gateway would load it.
binary = os.environ.get("MANIFOLD_BIN")
for f, d in docs:
    if d.get("kind") != "ConfigMap":
        continue
    keys = {k: v for k, v in (d.get("data") or {}).items() if k.endswith((".yaml", ".yml", ".json"))}
    if not keys:
        continue
    if not binary:
        print(f"note {f}: configmap/{name(d)} not checked with `manifold validate` (no binary: cargo build, or set MANIFOLD_BIN)")
        continue
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in keys.items():
            with open(os.path.join(tmp, k), "w") as out:
                out.write(v)
        r = subprocess.run([binary, "validate", tmp], capture_output=True, text=True, env={**os.environ, "MANIFOLD_LOG": "error"})
        if r.returncode != 0:
            say(f, f"configmap/{name(d)}: `manifold validate` refused its config:\n" + "\n".join("      " + l.replace(tmp + "/", "") for l in r.stderr.strip().splitlines()))
        else:
            print(f"ok   {f}: configmap/{name(d)}'s config passes `{binary} validate` ({r.stdout.strip()})")

# 3. Cross references.
def pod_templates():
    for f, d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet"):
            yield f, d, (spec.get("template") or {})
        elif d.get("kind") == "Job":
            yield f, d, (spec.get("template") or {})

configmaps = {name(d): d for _, d in docs if d.get("kind") == "ConfigMap"}
for f, d, tmpl in pod_templates():
    pspec = tmpl.get("spec") or {}
    vols = {v.get("name"): v for v in pspec.get("volumes") or []}
    for c in pspec.get("containers") or []:
        mounts = c.get("volumeMounts") or []
        for vname, v in vols.items():
            cm = (v.get("configMap") or {}).get("name")
            if cm not in configmaps:
                continue
            mine = [m for m in mounts if m.get("name") == vname]
            if any("subPath" not in m for m in mine):
                say(f, f"{d['kind'].lower()}/{name(d)}: configmap/{cm} is mounted as a whole directory: the loader would also read the kubelet's ..data copy (duplicate names); mount each key with subPath")
                continue
            if not mine:
                continue
            mounted = {m["subPath"] for m in mine}
            for key in (configmaps[cm].get("data") or {}):
                if key.endswith((".yaml", ".yml", ".json")) and key not in mounted:
                    say(f, f"{d['kind'].lower()}/{name(d)}: key {key} of configmap/{cm} has no subPath volumeMount, so the gateway would not serve it")

def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

services = {}
for f, d in docs:
    if d.get("kind") != "Service":
        continue
    spec = d.get("spec") or {}
    services[name(d)] = spec
    sel = spec.get("selector") or {}
    pods = [tmpl for _, w, tmpl in pod_templates() if w.get("kind") != "Job" and labels_match(sel, (tmpl.get("metadata") or {}).get("labels") or {})]
    if sel and not pods:
        say(f, f"service/{name(d)}: its selector {sel} matches no pod template here")
    port_names = {p.get("name") for t in pods for c in (t.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []}
    for p in spec.get("ports") or []:
        tp = p.get("targetPort")
        if isinstance(tp, str) and pods and tp not in port_names:
            say(f, f"service/{name(d)}: targetPort {tp!r} is no container port name of its pods ({sorted(n for n in port_names if n)})")

for f, d in docs:
    if d.get("kind") != "Ingress":
        continue
    for rule in (d.get("spec") or {}).get("rules") or []:
        for path in ((rule.get("http") or {}).get("paths") or []):
            svc = ((path.get("backend") or {}).get("service") or {})
            s = services.get(svc.get("name"))
            if s is None:
                say(f, f"ingress/{name(d)}: backend service {svc.get('name')!r} is not defined here")
                continue
            port = svc.get("port") or {}
            if not any(p.get("name") == port.get("name") if "name" in port else p.get("port") == port.get("number") for p in s.get("ports") or []):
                say(f, f"ingress/{name(d)}: service/{svc.get('name')} has no port {port}")

for f in sorted(bad):
    print(f"BADFILE {f}")
PY
); then
  echo "$cross"; echo "the cross-checks could not run"; exit 1
fi
[[ -z "$cross" ]] || grep -v '^BADFILE ' <<<"$cross" || true
while read -r f; do [[ -n "$f" ]] && fail "$f"; done < <(sed -n 's/^BADFILE //p' <<<"$cross")

if (( ${#failed[@]} > 0 )); then
  echo
  echo "invalid manifests:"
  printf '%s\n' "${failed[@]}" | sort -u | sed 's/^/  /'
  exit 1
fi
echo "all ${#files[@]} manifest files valid"
