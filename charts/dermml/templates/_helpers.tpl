{{/*
Names, labels, images, security contexts and env blocks shared by every template.
*/}}

{{- define "dermml.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix. Truncated to 40 characters so that "<fullname>-serving-<model>" and the
names KubeRay derives from the RayCluster ("<fullname>-ray-head-svc", ...) stay within 63.
*/}}
{{- define "dermml.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dermml.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "dermml.labels" -}}
helm.sh/chart: {{ include "dermml.chart" . }}
{{ include "dermml.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dermml
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dermml.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dermml.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Component labels. Call with (dict "ctx" $ "component" "mlflow").
The NetworkPolicies select pods by app.kubernetes.io/component, so keep these stable.
*/}}
{{- define "dermml.componentLabels" -}}
{{ include "dermml.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dermml.componentSelectorLabels" -}}
{{ include "dermml.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Object names. */}}
{{- define "dermml.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "dermml.fullname" .) }}
{{- end }}

{{- define "dermml.serving.fullname" -}}
{{- printf "%s-serving-%s" (include "dermml.fullname" .ctx) .model.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dermml.ray.fullname" -}}
{{- printf "%s-ray" (include "dermml.fullname" .) }}
{{- end }}

{{- define "dermml.pipelineRunner.fullname" -}}
{{- printf "%s-pipeline-runner" (include "dermml.fullname" .) }}
{{- end }}

{{/* MLflow URI for in-cluster clients: trackingUri, else the in-chart Service. */}}
{{- define "dermml.trackingUri" -}}
{{- if .Values.trackingUri }}
{{- .Values.trackingUri }}
{{- else }}
{{- printf "http://%s.%s.svc.cluster.local:%v" (include "dermml.mlflow.fullname" .) .Release.Namespace .Values.mlflow.service.port }}
{{- end }}
{{- end }}

{{/*
Host headers the MLflow server accepts (--allowed-hosts): every in-cluster name of its Service,
localhost (kubectl port-forward), the Ingress host and mlflow.allowedHosts. MLflow's default
(localhost + private IPs) would reject http://<svc>.<ns>.svc.cluster.local:5000.
*/}}
{{- define "dermml.mlflow.allowedHosts" -}}
{{- $svc := include "dermml.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost" "127.0.0.1" }}
{{- $all := list }}
{{- range $hosts }}
{{- $all = append $all . }}
{{- $all = append $all (printf "%s:*" .) }}
{{- end }}
{{- if .Values.mlflow.ingress.enabled }}
{{- $all = append $all .Values.mlflow.ingress.host }}
{{- $all = append $all (printf "%s:*" .Values.mlflow.ingress.host) }}
{{- end }}
{{- $all = concat $all .Values.mlflow.allowedHosts }}
{{- join "," $all }}
{{- end }}

{{/* Images. Call with (dict "ctx" $ "image" .Values.image). */}}
{{- define "dermml.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Security contexts (restricted Pod Security Standard). */}}
{{- define "dermml.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "dermml.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* Writable scratch space under a read-only root filesystem: /tmp and $HOME. */}}
{{- define "dermml.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratchSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.scratchSizeLimit }}
{{- end }}

{{- define "dermml.scratchVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ .Values.homeDir }}
{{- end }}

{{/* A Secret key as an env var. Call with (dict "name" "ENV" "secret" "s" "key" "k"). */}}
{{- define "dermml.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret | quote }}
      key: {{ .key | quote }}
{{- end }}

{{/* Env every dermml process needs: HOME and a writable DERMML_HOME. */}}
{{- define "dermml.baseEnv" -}}
- name: HOME
  value: {{ .Values.homeDir | quote }}
- name: DERMML_HOME
  value: /tmp/dermml
{{- end }}

{{/*
S3 credentials (from the existing Secret) and region. With s3.irsa.enabled no keys: the EKS pod
identity webhook gives pods of an annotated ServiceAccount web-identity credentials.
*/}}
{{- define "dermml.s3Env" -}}
{{- if not .Values.s3.irsa.enabled }}
{{ include "dermml.secretEnv" (dict "name" "AWS_ACCESS_KEY_ID" "secret" .Values.s3.existingSecret "key" .Values.s3.accessKeyIdKey) }}
{{ include "dermml.secretEnv" (dict "name" "AWS_SECRET_ACCESS_KEY" "secret" .Values.s3.existingSecret "key" .Values.s3.secretAccessKeyKey) }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}

{{/*
The eks.amazonaws.com/role-arn annotation of a ServiceAccount with IRSA, as an `annotations:`
block (nothing without IRSA). Call with (dict "ctx" $ "role" "mlflow"); fails without the ARN.
*/}}
{{- define "dermml.irsaAnnotations" -}}
{{- if .ctx.Values.s3.irsa.enabled }}
{{- $arn := get .ctx.Values.s3.irsa.roleArns .role }}
{{- if not $arn }}
{{- fail (printf "s3.irsa.roleArns.%s is required with s3.irsa.enabled (the IAM role of that ServiceAccount, infra/eks/cluster.yaml)" .role) }}
{{- end }}
annotations:
  eks.amazonaws.com/role-arn: {{ $arn | quote }}
{{- end }}
{{- end }}

{{/* Where MLflow clients send runs, plus their credentials when auth is on. */}}
{{- define "dermml.mlflowClientEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "dermml.trackingUri" . | quote }}
{{- if .Values.mlflow.auth.enabled }}
{{ include "dermml.secretEnv" (dict "name" "MLFLOW_TRACKING_USERNAME" "secret" .Values.mlflowClient.existingSecret "key" .Values.mlflowClient.usernameKey) }}
{{ include "dermml.secretEnv" (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" .Values.mlflowClient.existingSecret "key" .Values.mlflowClient.passwordKey) }}
{{- end }}
{{- end }}

{{/* Where model servers read models, with the reader identity's credentials when auth is on. */}}
{{- define "dermml.mlflowReaderEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "dermml.trackingUri" . | quote }}
{{- if .Values.mlflow.auth.enabled }}
{{ include "dermml.secretEnv" (dict "name" "MLFLOW_TRACKING_USERNAME" "secret" .Values.mlflowReader.existingSecret "key" .Values.mlflowReader.usernameKey) }}
{{ include "dermml.secretEnv" (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" .Values.mlflowReader.existingSecret "key" .Values.mlflowReader.passwordKey) }}
{{- end }}
{{- end }}

{{/* Env of the MLflow server and its migration Job: the backend store URI from its Secret. */}}
{{- define "dermml.mlflow.backendStoreEnv" -}}
{{ include "dermml.secretEnv" (dict "name" "MLFLOW_BACKEND_STORE_URI" "secret" .Values.mlflow.backendStore.existingSecret "key" .Values.mlflow.backendStore.uriKey) }}
{{- end }}


{{/*
A serving.models entry with defaults filled in (only name and modelUri are required), as YAML:
{{- $model := include "dermml.serving.model" $entry | fromYaml }}
*/}}
{{- define "dermml.serving.model" -}}
{{- $defaults := dict
  "resources" (dict)
  "hpa" (dict "enabled" false "minReplicas" 1 "maxReplicas" 3 "targetCPUUtilizationPercentage" 70)
  "pdb" (dict "enabled" false "minAvailable" 1)
  "storageUri" ""
  "version" "" }}
{{- $model := mergeOverwrite $defaults (deepCopy .) }}
{{- /* set, not merged: mergeOverwrite would not let an explicit 0 replace a default. */}}
{{- if not (hasKey $model "replicas") }}
{{- $_ := set $model "replicas" 1 }}
{{- end }}
{{- toYaml $model }}
{{- end }}

{{/* Env of Ray head and workers: dermml stages read data and write checkpoints on S3. */}}
{{- define "dermml.rayEnv" -}}
{{ include "dermml.baseEnv" . }}
{{ include "dermml.mlflowClientEnv" . }}
{{ include "dermml.s3Env" . }}
{{- with .Values.s3.endpointUrl }}
- name: DERMML_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Ray needs /tmp (session dir, spilling), $HOME and a large /dev/shm (object store). */}}
{{- define "dermml.rayVolumes" -}}
{{ include "dermml.scratchVolumes" .ctx }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ default "1Gi" .shmSize }}
{{- end }}

{{- define "dermml.rayVolumeMounts" -}}
{{ include "dermml.scratchVolumeMounts" . }}
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/*
Worker resources with the group's GPUs as nvidia.com/gpu in both requests and limits (extended
resources cannot be overcommitted, and KubeRay sets Ray's num-gpus from the limit).
Call with (dict "resources" $group.resources "gpu" $gpu).
*/}}
{{- define "dermml.ray.workerResources" -}}
{{- $resources := deepCopy (default dict .resources) }}
{{- if gt (int .gpu) 0 }}
{{- $limits := default dict $resources.limits }}
{{- $requests := default dict $resources.requests }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) }}
{{- $_ = set $requests "nvidia.com/gpu" (int .gpu) }}
{{- $_ = set $resources "limits" $limits }}
{{- $_ = set $resources "requests" $requests }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
NetworkPolicy peers for an endpoint given as CIDRs and/or in-cluster pod labels.
Call with (dict "what" "networkPolicy.postgres" "cidrs" list "podSelector" map).
Fails when both are empty: an egress rule with no peers would allow every destination.
*/}}
{{- define "dermml.networkPolicy.peers" -}}
{{- if and (empty .cidrs) (empty .podSelector) }}
{{- fail (printf "%s needs cidrs or podSelector: without peers the egress rule would allow every destination" .what) }}
{{- end }}
{{- range .cidrs }}
- ipBlock:
    cidr: {{ . }}
{{- end }}
{{- with .podSelector }}
- podSelector:
    matchLabels:
      {{- toYaml . | nindent 6 }}
{{- end }}
{{- end }}

{{/* Pods of this namespace that act as MLflow / Ray clients (see NOTES.txt for the label contract). */}}
{{- define "dermml.networkPolicy.dermmlPods" -}}
podSelector:
  matchLabels:
    app.kubernetes.io/part-of: dermml
  matchExpressions:
    - key: app.kubernetes.io/component
      operator: In
      values: {{ toJson .components }}
{{- end }}

{{/*
DermML's pipeline step pods in one client namespace (e.g. kubeflow): namespace AND pod labels in
one peer, so no other pod of that namespace matches. Call with (dict "ctx" $ "namespace" "kubeflow").
*/}}
{{- define "dermml.networkPolicy.pipelinePods" -}}
{{- if empty .ctx.Values.networkPolicy.pipelinePodLabels }}
{{- fail "networkPolicy.pipelinePodLabels must not be empty: it would admit every pod of networkPolicy.clientNamespaces" }}
{{- end }}
namespaceSelector:
  matchLabels:
    kubernetes.io/metadata.name: {{ .namespace }}
podSelector:
  matchLabels:
    {{- toYaml .ctx.Values.networkPolicy.pipelinePodLabels | nindent 4 }}
{{- end }}

{{- define "dermml.networkPolicy.namespace" -}}
namespaceSelector:
  matchLabels:
    kubernetes.io/metadata.name: {{ . }}
{{- end }}

{{/*
KServe mode (serving.mode: kserve). Labels of an InferenceService: KServe copies them onto the
predictor pods, so they leave out the release's selector labels (app.kubernetes.io/name and
instance), which the chart's default-deny NetworkPolicy selects: Knative's activator and
gateway must reach those pods, and their storage initializer S3. dermml.io/release names the
release instead.
*/}}
{{- define "dermml.kserve.labels" -}}
helm.sh/chart: {{ include "dermml.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dermml
app.kubernetes.io/component: inference
dermml.io/release: {{ .Release.Name }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dermml.kserve.runtimeName" -}}
{{- default (printf "%s-mlserver" (include "dermml.fullname" .)) .Values.serving.kserve.runtimeName }}
{{- end }}

{{/* The registered model of a models:/<name>@<alias> URI. Call with the URI. */}}
{{- define "dermml.kserve.registeredModel" -}}
{{- $ref := trimPrefix "models:/" . }}
{{- $parts := splitList "@" $ref }}
{{- if or (eq $ref .) (ne (len $parts) 2) }}
{{- fail (printf "serving.mode=kserve follows a registry alias: modelUri %q must be models:/<name>@<alias>" .) }}
{{- end }}
{{- first $parts }}
{{- end }}

{{/* What RayJob pods may use (rayJobPolicy), as JSON lists; the defaults are DermML's own. */}}
{{- define "dermml.rayJobPolicy.allowedImages" -}}
{{- $p := .Values.rayJobPolicy }}
{{- toJson (default (list .Values.image.repository .Values.gpuImage.repository) $p.allowedImages | uniq) }}
{{- end }}

{{- define "dermml.rayJobPolicy.allowedServiceAccounts" -}}
{{- toJson (default (list (include "dermml.ray.fullname" .)) .Values.rayJobPolicy.allowedServiceAccounts) }}
{{- end }}

{{- define "dermml.rayJobPolicy.allowedSecrets" -}}
{{- $default := list .Values.mlflowClient.existingSecret }}
{{- if not .Values.s3.irsa.enabled }}
{{- $default = append $default .Values.s3.existingSecret }}
{{- end }}
{{- toJson (default $default .Values.rayJobPolicy.allowedSecrets) }}
{{- end }}
