"""The Dockerfile builds the tree, checked without a container engine (tools/docker.sh
builds and runs the real image where one runs).

- The build stage's COPY lines, applied to a temporary directory as Docker would (with
  .dockerignore), hold everything CMake needs: configure and build the targets the
  Dockerfile builds there, and find the files the final stage copies out of it.
- The build stage's apt packages provide every pkg-config module CMakeLists.txt asks for,
  the llhttp sources and the tools; the final stage's provide every shared library the
  built programs load. "Provide" is read from this Debian machine's dpkg database: the
  package that owns the file must be one the stage installs, or a dependency of one, or
  part of every Debian base (priority required).

Unlike the other suites this one builds (about half a minute on two cores): what is under
test is the build itself. It needs a Debian host with the packages scripts/setup installs.
"""
import fnmatch
import os
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
DOCKERFILE = ROOT / "Dockerfile"

pytestmark = pytest.mark.skipif(not (shutil.which("dpkg-query") and shutil.which("pkg-config")
                                     and shutil.which("cmake")),
                                 reason="needs a Debian host with dpkg, pkg-config and cmake")


# --- Reading the Dockerfile ---------------------------------------------------

def parse_stages(text):
    """[{'name', 'from', 'instructions': [(KEYWORD, args)]}] in order; continuations joined."""
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue   # a comment inside a continued instruction
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    stages = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append({"name": name, "from": words[0], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args.strip()))
    return stages


def stage(stages, name):
    return next(s for s in stages if s["name"] == name)


def apt_packages(st):
    """Every package named after `apt-get install` in the stage's RUN lines."""
    out = []
    for keyword, args in st["instructions"]:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = shlex.split(command)
            words = [w for w in words if "=" not in w or w.startswith("-")]   # VAR=... prefixes
            if words[:2] == ["apt-get", "install"]:
                out += [w for w in words[2:] if not w.startswith("-")]
    return out


def copies(st):
    """(flags, sources, dest) of each COPY/ADD line."""
    out = []
    for keyword, args in st["instructions"]:
        if keyword in ("COPY", "ADD"):
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            rest = [w for w in words if not w.startswith("--")]
            out.append((flags, rest[:-1], rest[-1]))
    return out


def workdir(st):
    """The WORKDIR in effect at the stage's first COPY (this Dockerfile changes it once)."""
    wd = "/"
    for keyword, args in st["instructions"]:
        if keyword == "WORKDIR":
            wd = os.path.join(wd, args)
        if keyword in ("COPY", "ADD"):
            break
    return wd


def build_targets(st):
    targets = []
    for keyword, args in st["instructions"]:
        if keyword == "RUN" and "cmake --build" in args:
            targets += re.findall(r"--target\s+(\S+)", args)
    return targets


def ignored(rel, patterns):
    """Docker's .dockerignore for the patterns it uses here: globs on the path from the
    context's root, `**/` for any depth, a match on a directory covering what it holds."""
    parts = rel.split("/")
    for pat in patterns:
        pat = pat.rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat[3:]):
                return True
    return False


def dockerignore():
    path = ROOT / ".dockerignore"
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def apply_copies(st, dest_root):
    """The build stage's filesystem as far as its COPY lines make it, under dest_root."""
    patterns = dockerignore()
    wd = workdir(st)
    for flags, sources, dest in copies(st):
        if any(f.startswith("--from") for f in flags):
            continue
        target = pathlib.Path(dest_root) / os.path.join(wd, dest).lstrip("/")
        into_dir = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"Dockerfile: COPY {src}: not in the checkout"
            if path.is_dir():
                for f in path.rglob("*"):
                    rel = f.relative_to(ROOT).as_posix()
                    if f.is_file() and not ignored(rel, patterns):
                        out = target / f.relative_to(path)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, out)
            elif not ignored(src, patterns):
                out = target / path.name if into_dir else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


# --- Reading the dpkg database -------------------------------------------------

def owner(path):
    """The Debian package that owns a file (symbolic links and the merged /usr tried)."""
    tried = []
    for p in (str(path), "/usr" + str(path) if str(path).startswith("/lib") else None,
              os.path.realpath(path)):
        if p and p not in tried:
            tried.append(p)
            r = subprocess.run(["dpkg-query", "-S", p], capture_output=True, text=True)
            if r.returncode == 0:
                return r.stdout.split(":")[0].strip()
    pytest.fail(f"no Debian package owns {path} on this machine")


def closure(packages):
    """The packages plus everything they depend on, as installed here (every alternative
    of an `a | b` that is installed)."""
    seen, todo = set(), list(packages)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Depends}, ${Pre-Depends}", p],
                           capture_output=True, text=True)
        if r.returncode != 0:
            continue   # not installed here (curl), or a virtual package
        for alt in re.split(r"[,|]", r.stdout):
            name = alt.strip().split(" ")[0].split(":")[0]
            if name:
                todo.append(name)
    return seen


def in_every_base(package):
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Priority} ${Essential}", package],
                       capture_output=True, text=True)
    return r.returncode == 0 and ("required" in r.stdout or "yes" in r.stdout)


def missing_providers(needed_files, packages):
    """{file: owner} for each file whose package the list does not bring."""
    have = closure(packages)
    out = {}
    for f in needed_files:
        pkg = owner(f)
        if pkg not in have and not in_every_base(pkg):
            out[str(f)] = pkg
    return out


def cmake_build_needs():
    """The files the build stage must have: each pkg-config module's .pc, the llhttp
    sources and header, the compiler, cmake and pkg-config."""
    cm = (ROOT / "CMakeLists.txt").read_text()
    files = []
    for m in re.finditer(r"pkg_check_modules\(\s*\w+\s+([^)]*)\)", cm):
        modules = [w for w in m.group(1).split() if w not in ("REQUIRED", "QUIET", "IMPORTED_TARGET", "GLOBAL")]
        for mod in modules:
            r = subprocess.run(["pkg-config", "--path", mod], capture_output=True, text=True)
            assert r.returncode == 0, f"pkg-config finds no {mod} here (scripts/setup installs it)"
            files.append(r.stdout.split()[0])
    llhttp_dir = re.search(r"set\(LLHTTP_DIR\s+(\S+)", cm).group(1)
    files += [os.path.join(llhttp_dir, f) for f in ("api.c", "http.c", "llhttp.c")]
    files += [p for p in ("/usr/include/llhttp.h", "/usr/share/include/llhttp/llhttp.h",
                          "/usr/include/llhttp/llhttp.h") if os.path.exists(p)][:1]
    files += [shutil.which(t) for t in ("cc", "cmake", "pkg-config")]
    assert len(files) >= 10, files
    return files


def shared_libraries(binary):
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    return [m.group(1) for m in re.finditer(r"=>\s*(/\S+)", r.stdout)]


# --- The checks ---------------------------------------------------------------

@pytest.fixture(scope="module")
def stages():
    return parse_stages(DOCKERFILE.read_text())


def test_build_stage_packages_provide_what_cmake_needs(stages):
    build = stage(stages, "build")
    packages = apt_packages(build)
    assert "cmake" in packages, packages
    needs = cmake_build_needs()
    assert missing_providers(needs, packages) == {}
    # The check sees a missing package: without the LAPACKE headers it names them.
    without = [p for p in packages if p != "liblapacke-dev"]
    assert "liblapacke-dev" in missing_providers(needs, without).values()


def test_copy_set_builds_the_tree_and_the_image_gets_its_programs(stages, tmp_path):
    build = stage(stages, "build")
    final = stages[-1]
    targets = build_targets(build)
    assert "ebb" in targets and "ebb-pack" in targets, targets
    apply_copies(build, tmp_path)
    src = tmp_path / workdir(build).lstrip("/")
    assert (src / "CMakeLists.txt").exists()
    subprocess.run(["cmake", "-S", src, "-B", src / "build", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, capture_output=True)
    cmd = ["nice", "cmake", "--build", src / "build", "-j2"]
    for t in targets:
        cmd += ["--target", t]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # What the final stage takes from the build stage exists there.
    taken = [s for flags, sources, _ in copies(final) if "--from=build" in flags for s in sources]
    assert any(s.endswith("/build/ebb") for s in taken) and any(s.endswith("/build/ebb-pack") for s in taken), taken
    programs = []
    for s in taken:
        if s.startswith(workdir(build)):
            path = tmp_path / s.lstrip("/")
            assert path.exists(), f"the final stage copies {s}, which the build does not make"
            programs.append(path)

    # Every library they load comes with the final stage's packages.
    runtime = apt_packages(final)
    libs = sorted({lib for p in programs for lib in shared_libraries(p)})
    assert any("lapacke" in lib for lib in libs), libs   # ebb-pack's, so the check below means something
    assert missing_providers(libs, runtime) == {}
    without = [p for p in runtime if p != "liblapacke"]
    assert "liblapacke" in missing_providers(libs, without).values()


def test_copy_set_missing_a_folder_fails_to_configure(stages, tmp_path):
    """The check above can fail: the same copy without `tools` does not configure."""
    build = stage(stages, "build")
    build = dict(build, instructions=[(k, a) for k, a in build["instructions"]
                                      if not (k == "COPY" and a.split()[0] == "tools")])
    assert len(build["instructions"]) < len(stage(stages, "build")["instructions"])
    apply_copies(build, tmp_path)
    src = tmp_path / workdir(build).lstrip("/")
    r = subprocess.run(["cmake", "-S", src, "-B", src / "build"], capture_output=True, text=True)
    assert r.returncode != 0 and "ebbtools" in r.stderr, r.stderr[-2000:]


def test_parser_reads_continuations_and_stages():
    st = parse_stages("ARG BASE=x\nFROM ${BASE} AS b\n# c\nRUN apt-get update && \\\n"
                      "    DEBIAN_FRONTEND=noninteractive apt-get install -y \\\n"
                      "      # a comment\n      a b \\\n      c && rm -rf x\n"
                      "WORKDIR /src\nCOPY x y ./\nFROM ${BASE}\nCOPY --from=b /src/o /bin/\n")
    assert [s["name"] for s in st] == ["b", "1"]
    assert apt_packages(st[0]) == ["a", "b", "c"]
    assert copies(st[0]) == [([], ["x", "y"], "./")] and workdir(st[0]) == "/src"
    assert copies(st[1]) == [(["--from=b"], ["/src/o"], "/bin/")]
    assert ignored("build-asan/x.o", ["build*/"]) and ignored("a/b/__pycache__/c", ["**/__pycache__"])
    assert not ignored("tools/pack/pack.c", ["build*/", "models"])
