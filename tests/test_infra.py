"""Offline checks of infra/ (the Bicep CLI cannot be installed here, so pycep parses the files).

They check what `bicep build` would (every file parses, module params and outputs line up) and what a
review of the templates must: the app settings equal what the code reads, roles are least-privilege and
scoped to resources, no secret or key sits in a template, and the security properties hold.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from lark.exceptions import LarkError
from pycep import BicepParser

from core import storage
from core.settings import APP_SETTINGS, DEV_SETTINGS, STORAGE

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# Settings the platform reads, not the code (so core.settings.APP_SETTINGS does not list them).
PLATFORM_SETTINGS = {
    # The Functions host connects to its storage with the managed identity instead of a key...
    "AzureWebJobsStorage__credential",
    # ...and keeps leases and function keys in blobs; the code itself uses only queues and tables.
    "AzureWebJobsStorage__blobServiceUri",
    # Where the host and worker send telemetry (the instrumentation key in it is an id, not a credential)...
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    # ...and the Entra identity they send it as: the component refuses key-only ingestion.
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    # The Python worker's thread pool for synchronous functions (see the test of its value below).
    "PYTHON_THREADPOOL_THREAD_COUNT",
    # The largest request body the host buffers before a function runs.
    "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT",
}
# Settings the code reads that Azure deliberately does not set: the connection-string form of storage is the
# local (Azurite) alternative to the identity-based AzureWebJobsStorage__* settings, and would carry a key.
NOT_SET_IN_AZURE = {STORAGE}
# Values the app must get from Key Vault references, never as plain values.
KEY_VAULT_SETTINGS = {"DYNAMICS_CLIENT_SECRET", "WAVE_WEBHOOK_SECRETS", "WAVE_API_TOKEN"}

ROLE_IDS = {
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}
# Exactly these grants, each on one resource of the given type.
EXPECTED_ROLES = {
    ("Storage Blob Data Owner", "Microsoft.Storage/storageAccounts"),
    ("Storage Queue Data Contributor", "Microsoft.Storage/storageAccounts"),
    ("Storage Table Data Contributor", "Microsoft.Storage/storageAccounts"),
    ("Key Vault Secrets Officer", "Microsoft.KeyVault/vaults"),
    ("Monitoring Metrics Publisher", "Microsoft.Insights/components"),
}
# Oldest acceptable API version per provider namespace (each namespace's versions:
# https://learn.microsoft.com/azure/templates/); a new namespace must be added.
MIN_API_VERSIONS = {
    "Microsoft.Resources": "2024-03-01",
    "Microsoft.ManagedIdentity": "2024-11-30",
    "Microsoft.Storage": "2025-06-01",
    "Microsoft.KeyVault": "2024-11-01",
    "Microsoft.Web": "2025-03-01",
    "Microsoft.Insights": "2020-02-02",
    "Microsoft.OperationalInsights": "2025-07-01",
    "Microsoft.Authorization": "2022-04-01",
}
# Text that means a key, a key-bearing connection string or a SAS is in a template.
FORBIDDEN_TEXT = [
    r"AccountKey=",
    r"SharedAccessKey",
    r"SharedAccessSignature",
    r"\bsig=",
    r"DefaultEndpointsProtocol=",
    r"UseDevelopmentStorage",
    r"InstrumentationKey=",
    r"\blist[A-Za-z]*Keys?\(",
    r"\blistAccountSas\(",
    r"\blistServiceSas\(",
    r"\blistSecrets\(",
    r"\blistConnectionStrings\(",
    r"-----BEGIN",
]


@cache
def parse(path: Path) -> dict[str, Any]:
    return BicepParser().parse(text=path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def accessor(expr: Any) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but a plain property access."""
    if isinstance(expr, str):
        return [expr]
    op = expr.get("operator") if isinstance(expr, dict) else None
    if not op or op["type"] != "property_accessor":
        return None
    left, right = accessor(op["operands"]["operand_1"]), accessor(op["operands"]["operand_2"])
    return left + right if left and right else None


def resources(path: Path, type_: str | None = None) -> dict[str, dict[str, Any]]:
    found = parse(path).get("resources", {})
    return {name: res for name, res in found.items() if type_ is None or res["type"] == type_}


def only(path: Path, type_: str) -> dict[str, Any]:
    found = [res for res in resources(path, type_).values() if not res["existing"]]
    assert len(found) == 1, f"{rel(path)}: expected one {type_}, found {len(found)}"
    return found[0]["config"]


def symbol_type(path: Path, symbol: str) -> str | None:
    res = resources(path).get(symbol)
    return res["type"] if res else None


def module_file(name: str) -> Path:
    module = parse(MAIN)["modules"][name]
    return (MAIN.parent / module["detail"]["path"]).resolve()


def app_settings() -> tuple[Path, dict[str, Any]]:
    found = [
        (path, res["config"])
        for path in BICEP_FILES
        for res in resources(path, "Microsoft.Web/sites/config").values()
        if res["config"]["name"] == "appsettings"
    ]
    assert len(found) == 1, f"expected one appsettings resource, found {len(found)}"
    path, config = found[0]
    return path, config["properties"]


def site_file() -> Path:
    return app_settings()[0]


def main_modules() -> list[str]:
    try:
        return sorted(parse(MAIN)["modules"])
    except LarkError:  # test_every_bicep_file_parses reports it
        return []


def main_var(name: str) -> Any:
    return parse(MAIN)["variables"][name]["value"]


# --- every file parses, modules fit together ------------------------------------------------------


def test_the_expected_files_exist():
    assert MAIN in BICEP_FILES
    assert (INFRA / "main.parameters.json").is_file()
    assert (INFRA / "README.md").is_file()
    assert (ROOT / "azure.yaml").is_file()


@pytest.mark.parametrize("path", BICEP_FILES, ids=rel)
def test_every_bicep_file_parses(path):
    parsed = parse(path)
    assert parsed.get("resources") or parsed.get("modules"), f"{rel(path)} declares nothing"


@pytest.mark.parametrize("name", main_modules())
def test_each_module_is_a_local_file_given_exactly_the_params_it_declares(name):
    module = parse(MAIN)["modules"][name]
    assert module["type"] == "local", f"module {name} is fetched from a registry: {module['detail']}"
    path = module_file(name)
    assert path.is_file() and INFRA in path.parents, f"module {name}: {path} is not a file under infra/"
    declared = parse(path).get("parameters", {})
    passed = set(module["config"].get("params", {}))
    assert passed <= set(declared), f"module {name} gets params it does not declare: {passed - set(declared)}"
    required = {p for p, spec in declared.items() if spec["default"] is None}
    assert required <= passed, f"module {name} misses required params: {required - passed}"


def test_every_module_output_used_in_main_exists():
    used: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        path = accessor(node)
        if path and len(path) >= 3 and path[1] == "outputs":
            used.add((path[0], path[2]))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    main = parse(MAIN)
    walk(main["modules"])
    walk(main["outputs"])
    assert used, "main.bicep reads no module outputs; the walk is broken"
    for module, output in sorted(used):
        assert output in parse(module_file(module)).get("outputs", {}), f"{module}.outputs.{output} does not exist"


# --- app settings ---------------------------------------------------------------------------------


def test_the_allow_lists_are_honest():
    assert set(APP_SETTINGS) >= NOT_SET_IN_AZURE
    assert not PLATFORM_SETTINGS & set(APP_SETTINGS), "a platform setting is also read by the code: drop it here"


def test_app_settings_are_exactly_what_the_code_reads_plus_the_platform_ones():
    _, settings = app_settings()
    expected = (set(APP_SETTINGS) - NOT_SET_IN_AZURE) | PLATFORM_SETTINGS
    assert set(settings) == expected, (
        f"missing: {sorted(expected - set(settings))}, not read by anything: {sorted(set(settings) - expected)}"
    )
    assert not set(settings) & set(DEV_SETTINGS)


def test_the_worker_pool_is_what_the_local_stack_runs_with_and_leaves_http_room_beside_the_queues():
    from devstack.devhost import design_thread_count, discover
    from function_app import app

    _, settings = app_settings()
    deployed = settings["PYTHON_THREADPOOL_THREAD_COUNT"]
    assert isinstance(deployed, str) and deployed.isdigit(), "app settings are strings"
    assert int(deployed) == design_thread_count(), "local.settings.example.json must hold the deployed value"
    queues = json.loads((ROOT / "host.json").read_text())["extensions"]["queues"]
    lanes = len(discover(app)[1])
    # Every message the host may fetch for every queue function runs at once (the backfill sleeps through
    # penalties on its thread), and HTTP still finds a free thread: at least 16, a batch's worth.
    assert int(deployed) >= lanes * (queues["batchSize"] + queues["newBatchThreshold"]) + 16


def test_the_host_buffers_no_body_much_larger_than_the_webhook_accepts():
    from sync.events import MAX_BODY_BYTES

    limit = app_settings()[1]["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"]
    assert isinstance(limit, str) and limit.isdigit(), f"the limit must be a number of bytes as text: {limit!r}"
    # Above the webhook's limit, so a body just over it still gets the webhook's JSON 413; at most 16 KiB
    # above, so an anonymous caller can never make the host buffer the default 100 MB.
    assert MAX_BODY_BYTES < int(limit) <= MAX_BODY_BYTES + 16 * 1024
    example = json.loads((ROOT / "local.settings.example.json").read_text())
    assert example["Values"]["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"] == limit
    assert "FUNCTIONS_REQUEST_BODY_SIZE_LIMIT" in example["Comments"]


def test_secrets_come_from_key_vault_references_to_versioned_secret_uris():
    path, settings = app_settings()
    site_params = parse(path)["parameters"]
    function_module = next(m for m in parse(MAIN)["modules"] if module_file(m) == path)
    passed = parse(MAIN)["modules"][function_module]["config"]["params"]
    for name in KEY_VAULT_SETTINGS:
        match = re.fullmatch(r"@Microsoft\.KeyVault\(SecretUri=\$\{(\w+)\}\)", settings[name])
        assert match, f"{name} is not a Key Vault reference: {settings[name]!r}"
        param = match.group(1)
        assert param in site_params
        source = accessor(passed[param])
        assert source and source[1] == "outputs", f"{param} is not fed from a module output"
        vault_file = module_file(source[0])
        output = accessor(parse(vault_file)["outputs"][source[2]]["value"])
        assert output and output[1:] == ["properties", "secretUriWithVersion"], output
        assert symbol_type(vault_file, output[0]) == "Microsoft.KeyVault/vaults/secrets"


def test_the_app_runs_in_production_as_the_user_assigned_identity():
    path, settings = app_settings()
    assert settings["APP_ENV"] == "production"
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    for name in ("AZURE_CLIENT_ID", "AzureWebJobsStorage__clientId"):
        source = accessor(settings[name])
        assert source and source[1:] == ["properties", "clientId"], f"{name}: {settings[name]}"
        assert symbol_type(path, source[0]) == "Microsoft.ManagedIdentity/userAssignedIdentities"
    uami = accessor(settings["AZURE_CLIENT_ID"])[0]
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == (
        f"ClientId=${{{uami}.properties.clientId}};Authorization=AAD"
    )
    for service in ("blob", "queue", "table"):
        source = accessor(settings[f"AzureWebJobsStorage__{service}ServiceUri"])
        assert source and source[1:] == ["properties", "primaryEndpoints", service]
        assert symbol_type(path, source[0]) == "Microsoft.Storage/storageAccounts"
    vault = accessor(settings["KEY_VAULT_URL"])
    assert vault and vault[1:] == ["properties", "vaultUri"]
    assert symbol_type(path, vault[0]) == "Microsoft.KeyVault/vaults"


# --- roles ----------------------------------------------------------------------------------------


def role_assignments() -> list[tuple[Path, str, dict[str, Any]]]:
    return [
        (path, name, res["config"])
        for path in BICEP_FILES
        for name, res in resources(path, "Microsoft.Authorization/roleAssignments").items()
    ]


def test_role_assignments_are_scoped_to_one_resource_never_a_group_or_subscription():
    assert role_assignments(), "no role assignments found"
    for path, name, config in role_assignments():
        scope = config.get("scope")
        assert isinstance(scope, str), f"{rel(path)} {name}: scope {scope!r} is not a resource symbol"
        scope_type = symbol_type(path, scope)
        assert scope_type, f"{rel(path)} {name}: scope {scope!r} is not a resource (resource group / subscription?)"
        assert scope_type not in ("Microsoft.Resources/resourceGroups", "Microsoft.Resources/subscriptions")
        assert config["properties"]["principalType"] == "ServicePrincipal"
        assert config["name"]["function"]["type"] == "guid", f"{name}: name is not a deterministic guid()"


def test_roles_are_exactly_the_least_privilege_set():
    names_by_id = {role_id: name for name, role_id in ROLE_IDS.items()}
    granted = set()
    for path, name, config in role_assignments():
        definition = config["properties"]["roleDefinitionId"]["function"]
        assert definition["type"] == "subscription_resource_id"
        assert definition["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
        role = definition["parameters"]["resource_name_1"]
        role_id = parse(path)["variables"][role]["value"] if role in parse(path).get("variables", {}) else role
        assert role_id in names_by_id, f"{rel(path)} {name}: unexpected role {role_id}"
        granted.add((names_by_id[role_id], symbol_type(path, config["scope"])))
    assert granted == EXPECTED_ROLES
    assert len(role_assignments()) == len(EXPECTED_ROLES), "a role is granted twice"


# --- no secrets in templates ----------------------------------------------------------------------


def template_files() -> list[Path]:
    return [*BICEP_FILES, INFRA / "main.parameters.json", ROOT / "azure.yaml"]


@pytest.mark.parametrize("path", template_files(), ids=rel)
def test_no_key_connection_string_or_secret_value_in_templates(path):
    text = path.read_text()
    for pattern in FORBIDDEN_TEXT:
        assert not re.search(pattern, text, re.IGNORECASE), f"{rel(path)} matches {pattern!r}"


def secure_params(path: Path) -> set[str]:
    return {
        name
        for name, spec in parse(path).get("parameters", {}).items()
        if any(d["type"] == "secure" for d in spec["decorators"])
    }


@pytest.mark.parametrize("path", BICEP_FILES, ids=rel)
def test_secret_params_are_secure_without_defaults_and_never_output(path):
    params = parse(path).get("parameters", {})
    secret_like = {
        name
        for name in params
        if re.search(r"secret|token|password", name, re.I) and not name.endswith(("Uri", "Name"))
    }
    secure = secure_params(path)
    assert secret_like <= secure, f"{rel(path)}: not @secure(): {secret_like - secure}"
    for name in secure:
        assert params[name]["default"] is None, f"{rel(path)}: secure param {name} has a default"
    outputs = json.dumps(parse(path).get("outputs", {}))
    for name in secure:
        assert f'"{name}"' not in outputs and f"${{{name}}}" not in outputs, f"{rel(path)} outputs {name}"


def test_main_takes_the_three_secrets_as_secure_params_and_stores_them_in_key_vault():
    assert secure_params(MAIN) == {"dynamicsClientSecret", "waveWebhookSecrets", "waveApiToken"}
    vault_module = next(m for m in parse(MAIN)["modules"] if module_file(m).name == "keyvault.bicep")
    vault_file = module_file(vault_module)
    passed = parse(MAIN)["modules"][vault_module]["config"]["params"]
    stored = {
        res["config"]["properties"]["value"]
        for res in resources(vault_file, "Microsoft.KeyVault/vaults/secrets").values()
    }
    for name in secure_params(MAIN):
        assert passed[name] == name and name in secure_params(vault_file) and name in stored


def test_the_parameters_file_maps_every_param_and_secrets_only_from_the_environment():
    mapped = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    params = parse(MAIN)["parameters"]
    assert set(mapped) <= set(params), f"not params of main.bicep: {set(mapped) - set(params)}"
    required = {name for name, spec in params.items() if spec["default"] is None}
    assert required <= set(mapped), f"azd would not pass: {required - set(mapped)}"
    for name in mapped:
        spec, value = params[name], mapped[name]["value"]
        assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(=[^}]*)?\}", value), f"{name}: {value!r} is not ${{ENV_VAR}}"
        if spec["default"] is None:
            assert "=" not in value, f"required param {name} must come from the azd environment, not a default"


# --- resource properties --------------------------------------------------------------------------


def test_storage_refuses_shared_keys_and_has_the_queues_and_tables():
    storage_file = module_file("storage")
    props = only(storage_file, "Microsoft.Storage/storageAccounts")["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["supportsHttpsTrafficOnly"] is True
    queue_names, table_names = main_var("queueNames"), main_var("tableNames")
    for queue in storage.QUEUES:
        assert {queue, storage.poison_queue_name(queue)} <= set(queue_names)
    assert all(re.fullmatch(r"[a-z0-9](-?[a-z0-9]){2,62}", q) for q in queue_names)
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", t) for t in table_names)
    assert len(set(queue_names)) == len(queue_names) and len(set(table_names)) == len(table_names)
    passed = parse(MAIN)["modules"]["storage"]["config"]["params"]
    assert passed["queueNames"] == "queueNames" and passed["tableNames"] == "tableNames"
    loops = {
        res["type"].rsplit("/", 1)[1]: res["config"]["loop_type"]["detail"]["array_name"]
        for res in resources(storage_file).values()
        if res["type"].endswith(("/queues", "/tables"))
    }
    assert loops == {"queues": "queueNames", "tables": "tableNames"}


CODE_PACKAGES = ("core", "oauth", "sync")


def module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` and `A, B = "x", "y"` string constants."""
    found: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = [(target, value)]
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            pairs = list(zip(target.elts, value.elts, strict=True))
        for name, const in pairs:
            if isinstance(name, ast.Name) and isinstance(const, ast.Constant) and isinstance(const.value, str):
                found[name.id] = const.value
    return found


def tables_the_code_opens() -> dict[str, str]:
    """Table name -> where: module constants named TABLE/*_TABLE and names passed to a `tables(...)` call."""
    trees = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): ast.parse(path.read_text())
        for package in CODE_PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    constants = {module: module_constants(tree) for module, tree in trees.items()}
    used: dict[str, str] = {}
    for module, tree in trees.items():
        scope = dict(constants[module])
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module in constants:
                for alias in node.names:
                    if alias.name in constants[node.module]:
                        scope[alias.asname or alias.name] = constants[node.module][alias.name]
        for name, value in constants[module].items():
            if name == "TABLE" or name.endswith("_TABLE"):
                used[value] = f"{module}.{name}"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) != "tables":
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                used[arg.value] = f"{module}:{node.lineno}"
            elif isinstance(arg, ast.Name) and arg.id in scope:
                used[scope[arg.id]] = f"{module}:{node.lineno}"
    return used


def test_every_table_the_code_opens_is_created_by_the_bicep():
    used = tables_the_code_opens()
    assert used, "found no table names in the code; the scan is broken"
    missing = {name: where for name, where in used.items() if name not in main_var("tableNames")}
    assert not missing, f"add these to tableNames in infra/main.bicep: {missing}"


def test_key_vault_is_standard_rbac_with_soft_delete_and_purge_protection():
    props = only(module_file("keyVault"), "Microsoft.KeyVault/vaults")["properties"]
    assert props["sku"] == {"family": "A", "name": "standard"}
    assert props["enableRbacAuthorization"] is True
    assert props["enableSoftDelete"] is True
    assert props["enablePurgeProtection"] is True
    assert "accessPolicies" not in props


def test_the_function_app_is_flex_consumption_python_311_on_linux_with_the_identity():
    path = site_file()
    plan = only(path, "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True
    site = only(path, "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    props = site["properties"]
    assert props["httpsOnly"] is True
    assert accessor(props["serverFarmId"]) == [next(iter(resources(path, "Microsoft.Web/serverfarms"))), "id"]
    uami = accessor(props["keyVaultReferenceIdentity"])
    assert uami and uami[1] == "id" and symbol_type(path, uami[0]) == "Microsoft.ManagedIdentity/userAssignedIdentities"
    config = props["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    python = re.search(r'requires-python = ">=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text())
    assert python and python.group(1) == config["runtime"]["version"], "runtime differs from pyproject.toml"
    deployment = config["deployment"]["storage"]
    assert deployment["type"] == "blobContainer"
    assert deployment["authentication"]["type"] == "UserAssignedIdentity"
    assert accessor(deployment["authentication"]["userAssignedIdentityResourceId"]) == uami


def test_application_insights_takes_only_entra_authenticated_telemetry():
    component = only(module_file("monitoring"), "Microsoft.Insights/components")
    props = {key.lower(): value for key, value in component["properties"].items()}
    assert props["disablelocalauth"] is True
    assert accessor(props["workspaceresourceid"]) is not None


def test_api_versions_are_current_and_not_preview():
    for path in BICEP_FILES:
        for name, res in resources(path).items():
            namespace = res["type"].split("/", 1)[0]
            assert namespace in MIN_API_VERSIONS, f"{rel(path)} {name}: add {namespace} to MIN_API_VERSIONS"
            version = res["api_version"]
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", version), f"{rel(path)} {name}: {version} (preview?)"
            assert version >= MIN_API_VERSIONS[namespace], f"{rel(path)} {name}: {version} is outdated"


# --- azd ------------------------------------------------------------------------------------------


def test_azd_finds_the_infra_the_service_and_its_outputs():
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^infra:\n(  .*\n)*?  path: infra$", text, re.M)
    service = re.search(r"^services:\n  (\w+):\n((?:    .*\n)+)", text, re.M)
    assert service, "azure.yaml declares no service"
    body = service.group(2)
    for line in ("project: .", "language: python", "host: function"):
        assert f"    {line}\n" in body
    site = only(site_file(), "Microsoft.Web/sites")
    # union(tags, {'azd-service-name': ...}): azd finds the app to deploy to by this tag.
    merged = [arg for arg in site["tags"]["function"]["parameters"].values() if isinstance(arg, dict)]
    assert {"'azd-service-name'": service.group(1)} in merged, "the site's azd-service-name tag is not the service"
    outputs = set(parse(MAIN)["outputs"])
    assert {"AZURE_FUNCTION_NAME", "AZURE_LOCATION", "AZURE_TENANT_ID", "AZURE_RESOURCE_GROUP"} <= outputs
    assert "OAUTH_REDIRECT_URI" in outputs
