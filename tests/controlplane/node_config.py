"""The node's configuration files and manifests: containerd (CRI) with its CNI network, kubeconfigs, kubelet,
kube-proxy, and CoreDNS as a pod behind the kube-dns Service."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.controlplane import pki
from tests.controlplane.host import BRIDGE, CNI_DIR, GATEWAY, SERVICE_CIDR, write_file
from tests.controlplane.images import IMAGE_PREFIX

NODE_NAME = "batchinfer-node"
POD_CIDR = "198.18.0.0/16"
DNS_SERVICE_IP = "198.19.0.10"


def containerd_config(folder: Path) -> Path:
    run = folder / "run"
    text = f"""version = 2
root = "{folder / "containerd" / "root"}"
state = "{folder / "containerd" / "state"}"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{run / "containerd.sock"}"
[ttrpc]
  address = "{run / "containerd.sock.ttrpc"}"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{folder / "containerd" / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE_PREFIX}/pause:3.10"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # No CAP_SYS_RESOURCE on these machines: runc cannot lower oom_score_adj (the pause container asks for -998).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{folder / "cni" / "net.d"}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
"""
    cni = {
        "cniVersion": "1.0.0",
        "name": "batchinfer",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": False,  # no default route: nothing a pod sends can leave the machine
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(folder / "cni" / "ipam"),
                    "ranges": [[{"subnet": POD_CIDR, "rangeStart": "198.18.0.10", "gateway": GATEWAY}]],
                    "routes": [{"dst": SERVICE_CIDR}],
                },
            }
        ],
    }
    write_file(folder / "cni" / "net.d" / "10-batchinfer.conflist", json.dumps(cni, indent=2))
    return write_file(folder / "etc" / "containerd.toml", text)


def kubeconfig(folder: Path, url: str, ca: Path, name: str, cert: Path, key: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "batchinfer-test", "cluster": {"server": url, "certificate-authority": str(ca)}}],
        "users": [{"name": name, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "batchinfer-test", "context": {"cluster": "batchinfer-test", "user": name}}],
        "current-context": "batchinfer-test",
    }
    return write_file(folder / "creds" / f"{name}.kubeconfig", yaml.safe_dump(config))


def kubelet_config(folder: Path, keys: pki.Pki, serving: tuple[Path, Path]) -> Path:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{folder / 'run' / 'containerd.sock'}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "address": GATEWAY,  # the API server reaches the kubelet on the node's InternalIP
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(serving[0]),
        "tlsPrivateKeyFile": str(serving[1]),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(keys.ca_cert)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [DNS_SERVICE_IP],
        "resolvConf": str(write_file(folder / "etc" / "resolv.conf", "")),  # no upstream resolver for pods
        "podLogsDir": str(folder / "pod-logs"),
        "volumePluginDir": str(folder / "kubelet" / "volume-plugins"),
        "registerNode": True,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "maxPods": 50,
        # The node shares the machine's disk with everything else: a share of it (5%: 12 GB of 252 GB) put the
        # node under DiskPressure and evicted the operator's pod; evict only when the disk is really full.
        "evictionHard": {"memory.available": "200Mi", "nodefs.available": "1Gi", "imagefs.available": "1Gi"},
        # No image garbage collection (100 turns it off): every image is imported once and there is no registry
        # to pull it from again, so an image the kubelet deletes is gone for good. The pause image is the worst:
        # kubelet >= 1.28 leaves it to the runtime to report it pinned, which containerd 1.6 does not (1.7 does),
        # so on a disk above the threshold it can go, and every later pod stays ContainerCreating (what a CI run
        # on a 98%-full disk showed, with GC at 99%).
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    }
    return write_file(folder / "etc" / "kubelet.yaml", yaml.safe_dump(config))


def kube_proxy_config(folder: Path, kubeconfig_path: Path, healthz_port: int, metrics_port: int) -> Path:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_path)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "detectLocalMode": "ClusterCIDR",
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [f"{GATEWAY}/32"],
        "oomScoreAdj": 0,
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s", "minSyncPeriod": "1s"},
        # 0: leave the host's conntrack sysctls alone
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }
    return write_file(folder / "etc" / "kube-proxy.yaml", yaml.safe_dump(config))


COREFILE = """.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
}
"""


def coredns_manifests() -> list[dict]:
    """ServiceAccount, RBAC, Corefile, Deployment and the kube-dns Service (no `forward`: nothing leaves)."""
    ns, labels = "kube-system", {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": ns}
    container = {
        "name": "coredns",
        "image": f"{IMAGE_PREFIX}/coredns:1.15.0",
        "imagePullPolicy": "Never",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [{"containerPort": 53, "protocol": "UDP", "name": "dns"}, {"containerPort": 53, "name": "dns-tcp"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
        "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": ns}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": COREFILE}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**meta, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "priorityClassName": "system-cluster-critical",
                        "containers": [container],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": ns, "labels": labels},
            "spec": {
                "clusterIP": DNS_SERVICE_IP,
                "selector": labels,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]
