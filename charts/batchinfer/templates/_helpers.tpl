{{/* Names and labels. */}}
{{- define "batchinfer.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "batchinfer.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "batchinfer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "batchinfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: batchinfer
{{- end -}}

{{- define "batchinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "batchinfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "batchinfer.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "batchinfer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "batchinfer.jobImage" -}}
{{- printf "%s:%s" .Values.jobImage.repository (default .Chart.AppVersion .Values.jobImage.tag) -}}
{{- end -}}

{{/*
RBAC rules of the operator, written once and used by the ClusterRole or each namespace's Role.
No wildcards; no Secrets (credentials reach Ray pods by reference only).
*/}}
{{- define "batchinfer.namespacedRules" -}}
# batchinfer: the resource it reconciles, and its status.
- apiGroups: ["batchinfer.dev"]
  resources: ["batchinferences"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["batchinfer.dev"]
  resources: ["batchinferences/status"]
  verbs: ["get", "patch"]
# Children carry an owner reference with blockOwnerDeletion: true; clusters that enforce owner-reference
# permissions (the OwnerReferencesPermissionEnforcement admission plugin, on in OpenShift) require this.
- apiGroups: ["batchinfer.dev"]
  resources: ["batchinferences/finalizers"]
  verbs: ["update"]
# batchinfer: the children it creates per BatchInference.
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  # delete: a BatchInference past activeDeadlineSeconds stops its RayJob (and, by garbage collection, its pods).
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts"]
  verbs: ["get", "create"]
# batchinfer: while a job waits to run, why its pods do not (image pulls, missing Secrets, scheduling).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# batchinfer: a Role/RoleBinding that lets each job patch its own BatchInference's status (progress).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
# kopf: Kubernetes Events about the objects it handles.
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{- define "batchinfer.clusterRules" -}}
# kopf: discovery of custom resources and namespaces.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
# BatchInferenceClasses (cluster-scoped): read only; the platform team owns them.
- apiGroups: ["batchinfer.dev"]
  resources: ["batchinferenceclasses"]
  verbs: ["get", "list", "watch"]
{{- if .Values.peering.enabled }}
# kopf: peering, so that only one operator pod acts at a time.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end -}}
