"""Recipe parsing, validation and hashing as plain functions (no Docker)."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from bai_spawner.images import recipes as R
from bai_spawner.images import sources
from bai_spawner.images.builder import manylinux_platforms

DEFAULT_RECIPES = sources.recipes_dir()

GOOD = {
    "name": "sklearn-1.6", "image": "sklearn", "framework": "scikit-learn", "version": "1.6.1",
    "display_name": "scikit-learn 1.6", "base": "base", "packages": ["scikit-learn==1.6.1"],
}
BASE = {
    "name": "base", "kind": "base", "framework": "debian", "version": "bookworm",
    "display_name": "Base", "base": "rootfs", "apt": ["python3", "tini"],
    "packages": ["jupyterhub=={host:jupyterhub}"], "venvs": {"mlflow": ["mlflow==3.17.2"]},
    "kernel_packages": ["ipykernel==7.4.0", "mlflow-skinny==3.17.2"], "extensions": True,
}


def write(tmp_path: Path, data: dict, name=None) -> Path:
    lines = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if isinstance(v, dict):
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, list):
            lines.append(f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]")
        else:
            lines.append(f'{k} = "{v}"')
    for t, kv in tables.items():
        lines.append(f"[{t}]")
        for k, v in kv.items():
            lines.append(f"{k} = [{', '.join(chr(34) + x + chr(34) for x in v)}]")
    p = tmp_path / f"{name or data.get('name', 'x')}.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_shipped_recipes_parse_and_form_a_tree():
    recipes = R.load_recipes(DEFAULT_RECIPES)
    assert {"base", "sklearn-1.5", "sklearn-1.6", "pytorch-2.13", "pytorch-2.14", "tensorflow-2.21",
            "tensorflow-2.18", "tensorflow-1.15"} <= set(recipes)
    assert recipes["base"].is_root and recipes["base"].kind == "base" and not recipes["base"].offered
    # CI builds one image of each framework; the second versions are built on request
    assert R.default_names(recipes) == ["base", "pytorch-2.13", "sklearn-1.5", "sklearn-1.6", "tensorflow-2.21"]
    for name in ("pytorch-2.14", "tensorflow-2.18", "tensorflow-1.15"):
        assert recipes[name].default is False
    assert recipes["sklearn-1.6"].image_ref() == "bai/sklearn:1.6.1"
    assert recipes["sklearn-1.5"].image_ref("bai-test-x/") == "bai-test-x/sklearn:1.5.2"
    assert recipes["base"].image_ref() == "bai/base:bookworm"
    assert recipes["pytorch-2.13"].image_ref() == "bai/pytorch:2.13.0"
    # two versions of each framework, every one built on the base
    for framework in ("scikit-learn", "TensorFlow", "PyTorch"):
        ours = [r for r in recipes.values() if r.framework == framework and r.python is None]
        assert len({r.version for r in ours}) == 2, framework
        assert all(r.base == "base" for r in ours)
    # every offered recipe that can be built checks its framework's version and trains
    for r in recipes.values():
        if r.offered and r.python is None:
            assert r.test and r.version.rsplit(".", 1)[0] in r.test and ("fit(" in r.test or "step()" in r.test), r.name


def test_kernel_environment_gets_the_base_kernel_packages_with_the_recipe_pins_winning(tmp_path):
    write(tmp_path, BASE)
    write(tmp_path, GOOD)
    write(tmp_path, {**GOOD, "name": "old-kernel", "image": "old", "packages": ["ipykernel==6.29.5",
                                                                              "scikit-learn==1.6.1"]})
    write(tmp_path, {**GOOD, "name": "extra", "image": "extra", "base": "sklearn-1.6",
                     "packages": ["joblib==1.4.2"]})
    recipes = R.load_recipes(tmp_path)
    assert R.kernel_requirements(recipes, "sklearn-1.6") == [
        "ipykernel==7.4.0", "mlflow-skinny==3.17.2", "scikit-learn==1.6.1"]
    assert R.kernel_requirements(recipes, "old-kernel") == [
        "mlflow-skinny==3.17.2", "ipykernel==6.29.5", "scikit-learn==1.6.1"]
    # built on a kernel image: only its own packages, added to that environment
    assert R.kernel_requirements(recipes, "extra") == ["joblib==1.4.2"]
    assert R.dist_name("Mlflow_Skinny==3.17.2") == "mlflow-skinny"


def test_good_recipe_parses(tmp_path):
    r = R.load_recipe(write(tmp_path, GOOD))
    assert r.name == "sklearn-1.6" and r.packages == ("scikit-learn==1.6.1",)
    assert r.default is True and r.kind == "kernel" and r.offered
    assert [R.dist_name(p) for p in r.packages] == ["scikit-learn"]


@pytest.mark.parametrize("field", ["name", "framework", "version", "display_name", "base", "packages"])
def test_missing_field_names_file_and_field(tmp_path, field):
    data = {k: v for k, v in GOOD.items() if k != field}
    p = write(tmp_path, data, name="sklearn-1.6")
    with pytest.raises(R.RecipeError) as e:
        R.load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and f"'{field}'" in msg and "missing" in msg and "add it" in msg


@pytest.mark.parametrize("change,field,words", [
    ({"packages": ["scikit-learn"]}, "packages", "not pinned"),
    ({"packages": ["scikit-learn>=1.6"]}, "packages", "not pinned"),
    ({"packages": ["scikit-learn==1.*"]}, "packages", "not pinned"),
    ({"packages": ["not a requirement!"]}, "packages", "invalid requirement"),
    ({"packages": "scikit-learn==1.6.1"}, "packages", "list of strings"),
    ({"version": "1.6 beta"}, "version", "invalid value"),
    ({"name": "Sklearn"}, "name", "invalid value"),
    ({"default": "yes"}, "default", "true or false"),
    ({"python": "three"}, "python", "invalid value"),
    ({"kind": "private"}, "kind", "invalid value"),
    ({"kind": "base"}, "kind", 'must say kind = "base"'),
    ({"kernel_packages": ["ipykernel==7.4.0"]}, "kernel_packages", "only allowed"),
    ({"apt": ["git"]}, "apt", "only allowed"),
    ({"colour": "blue"}, "colour", "not a recipe field"),
    ({"base": "sklearn-1.6"}, "base", "itself"),
    ({"base": "rootfs", "kind": "base", "venvs": {"kernel": ["x==1"]}}, "venvs.kernel", "usable directory"),
])
def test_invalid_fields(tmp_path, change, field, words):
    p = write(tmp_path, {**GOOD, **change}, name="sklearn-1.6")
    with pytest.raises(R.RecipeError) as e:
        R.load_recipe(p)
    assert str(p) in str(e.value) and f"'{field}'" in str(e.value) and words in str(e.value)


def test_file_name_must_match(tmp_path):
    p = write(tmp_path, GOOD, name="other")
    with pytest.raises(R.RecipeError, match="rename the file"):
        R.load_recipe(p)


def test_invalid_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("name = \n")
    with pytest.raises(R.RecipeError, match="not valid TOML"):
        R.load_recipe(p)


def test_unknown_base_and_cycles(tmp_path):
    write(tmp_path, GOOD)
    with pytest.raises(R.RecipeError, match="'base' names 'base', which is not a recipe"):
        R.load_recipes(tmp_path)
    write(tmp_path, {**GOOD, "name": "base", "image": "b", "base": "sklearn-1.6"})
    with pytest.raises(R.RecipeError, match="cycle"):
        R.load_recipes(tmp_path)


def test_duplicate_image_refs(tmp_path):
    write(tmp_path, BASE)
    write(tmp_path, GOOD)
    write(tmp_path, {**GOOD, "name": "sklearn-dup"})
    with pytest.raises(R.RecipeError, match="same as recipe"):
        R.load_recipes(tmp_path)


def test_base_fields_and_host_pins(tmp_path):
    write(tmp_path, BASE)
    write(tmp_path, GOOD)
    recipes = R.load_recipes(tmp_path)
    base = recipes["base"].resolved(lambda dist: {"jupyterhub": "6.1.1"}[dist])
    assert base.packages == ("jupyterhub==6.1.1",)
    assert base.venvs == (("mlflow", ("mlflow==3.17.2",)),) and base.extensions
    assert base.kernel_packages == ("ipykernel==7.4.0", "mlflow-skinny==3.17.2")
    with pytest.raises(R.RecipeError, match="not installed on the host"):
        recipes["base"].resolved(lambda dist: (_ for _ in ()).throw(LookupError(dist)))


def test_build_order_bases_first():
    recipes = R.load_recipes(DEFAULT_RECIPES)
    assert R.build_order(recipes, ["sklearn-1.6", "sklearn-1.5"]) == ["base", "sklearn-1.6", "sklearn-1.5"]
    assert R.base_chain(recipes, "sklearn-1.5") == ["sklearn-1.5", "base"]


def _recipes(tmp_path, hub="6.1.1"):
    write(tmp_path, BASE)
    write(tmp_path, GOOD)
    write(tmp_path, {**GOOD, "name": "sklearn-1.5", "version": "1.5.2",
                     "packages": ["scikit-learn==1.5.2"]})
    return {n: r.resolved(lambda d: hub) for n, r in R.load_recipes(tmp_path).items()}


def test_hash_is_stable_and_ignores_paths_and_comments(tmp_path):
    (tmp_path / "a").mkdir()
    a = R.recipe_hashes(_recipes(tmp_path / "a"))
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = R.recipe_hashes(_recipes(b_dir))
    assert a == b
    p = b_dir / "sklearn-1.6.toml"
    p.write_text("# a comment\n" + p.read_text())
    assert R.recipe_hashes({n: r.resolved(lambda d: "6.1.1") for n, r in R.load_recipes(b_dir).items()}) == a


def test_changed_recipe_rebuilds_only_dependants(tmp_path):
    recipes = _recipes(tmp_path)
    h0 = R.recipe_hashes(recipes)
    bumped = dict(recipes, **{"sklearn-1.6": dataclasses.replace(
        recipes["sklearn-1.6"], packages=("scikit-learn==1.6.1", "joblib==1.4.2"))})
    h1 = R.recipe_hashes(bumped)
    assert h1["sklearn-1.6"] != h0["sklearn-1.6"]
    assert h1["sklearn-1.5"] == h0["sklearn-1.5"] and h1["base"] == h0["base"]
    # changing the base changes everything built on it
    h2 = R.recipe_hashes(dict(recipes, base=dataclasses.replace(recipes["base"], apt=("python3", "git"))))
    assert all(h2[n] != h0[n] for n in h0)
    # and what every kernel environment gets from the base
    h2k = R.recipe_hashes(dict(recipes, base=dataclasses.replace(recipes["base"],
                                                                 kernel_packages=("ipykernel==6.29.5",))))
    assert all(h2k[n] != h0[n] for n in h0)
    # so does the host's jupyterhub version, the extensions tree and the builder salt
    h3 = R.recipe_hashes(_recipes(tmp_path, hub="6.2.0"))
    assert h3["base"] != h0["base"] and h3["sklearn-1.5"] != h0["sklearn-1.5"]
    assert R.recipe_hashes(recipes, extensions_digest="x")["sklearn-1.6"] != h0["sklearn-1.6"]
    assert R.recipe_hashes(recipes, salt="v2")["base"] != h0["base"]
    # description and default do not change the image
    h4 = R.recipe_hashes(dict(recipes, **{"sklearn-1.5": dataclasses.replace(
        recipes["sklearn-1.5"], description="new words", default=False)}))
    assert h4 == h0


def test_tree_digest(tmp_path):
    d = tmp_path / "ext"
    assert R.tree_digest(d) == "absent" and not R.is_installable(d)
    (d / "pkg").mkdir(parents=True)
    (d / "pyproject.toml").write_text("[project]\nname='x'\n")
    (d / "pkg" / "a.py").write_text("A = 1\n")
    h = R.tree_digest(d)
    assert R.is_installable(d)
    (d / "pkg" / "__pycache__").mkdir()
    (d / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (d / "build").mkdir()
    (d / "x.egg-info").mkdir()
    (d / "x.egg-info" / "PKG-INFO").write_text("junk")
    assert R.tree_digest(d) == h
    (d / "pkg" / "a.py").write_text("A = 2\n")
    assert R.tree_digest(d) != h


def test_python_mismatch_message():
    recipes = R.load_recipes(DEFAULT_RECIPES)
    tf1 = recipes["tensorflow-1.15"]
    msg = R.python_mismatch(tf1, "3.11.2")
    assert msg and "needs Python 3.7" in msg and "3.11.2" in msg
    assert R.python_mismatch(recipes["sklearn-1.6"], "3.11.2") is None
    assert R.python_mismatch(dataclasses.replace(tf1, python="3.11"), "3.11.2") is None


def test_manylinux_platforms():
    p = manylinux_platforms("2.36", "x86_64")
    assert p[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in p
    assert {"manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"} <= set(p)
    assert "manylinux_2_37_x86_64" not in p
    a = manylinux_platforms("2.36", "aarch64")
    assert "manylinux2014_aarch64" in a and "manylinux1_aarch64" not in a


def _hash_column(table: str, name: str) -> str:
    row = next(line for line in table.splitlines() if line.split()[0] == name)
    return row.split()[-1]


def test_recipes_command_uses_the_same_extensions_folder_as_build(tmp_path, capsys, monkeypatch):
    """`bai-images recipes` shows the hashes `build` looks for, with the
    extensions folder given the same way (option or environment)."""
    from bai_spawner.images.builder import Builder, plan
    from bai_spawner.images.cli import main

    ext = tmp_path / "ext"
    shutil.copytree(sources.extensions_dir(), ext, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (ext / "bai_session_apps" / "local.py").write_text("SITE = 'changed'\n")
    shipped = plan()[3]
    changed = plan(extensions_dir=ext)[3]
    assert changed["base"] != shipped["base"] and changed["sklearn-1.6"] != shipped["sklearn-1.6"]
    assert Builder(client=object(), extensions_dir=ext).hashes == changed  # no engine needed to plan

    assert main(["recipes", "--extensions", str(ext)]) == 0
    assert _hash_column(capsys.readouterr().out, "base") == changed["base"]
    monkeypatch.setenv(sources.EXTENSIONS_ENV, str(ext))
    assert main(["recipes"]) == 0
    assert _hash_column(capsys.readouterr().out, "base") == changed["base"]
    assert Builder(client=object()).hashes == changed


def test_sources_come_from_config_then_from_what_is_installed(tmp_path, monkeypatch):
    monkeypatch.delenv(sources.RECIPES_ENV, raising=False)
    monkeypatch.delenv(sources.EXTENSIONS_ENV, raising=False)
    import hub_config
    assert sources.recipes_dir() == Path(hub_config.__file__).parent / "images"
    assert (sources.extensions_dir() / "pyproject.toml").is_file()  # where `pip install -e` took it from
    assert sources.recipes_dir(tmp_path) == tmp_path
    monkeypatch.setenv(sources.RECIPES_ENV, str(tmp_path / "r"))
    monkeypatch.setenv(sources.EXTENSIONS_ENV, str(tmp_path / "e"))
    assert (sources.recipes_dir(), sources.extensions_dir()) == (tmp_path / "r", tmp_path / "e")
    monkeypatch.delenv(sources.EXTENSIONS_ENV)
    monkeypatch.setattr(sources, "EXTENSIONS_DIST", "no-such-distribution")
    with pytest.raises(sources.SourceError, match="pip install -e ./extensions.*--extensions DIR"):
        sources.extensions_dir()
