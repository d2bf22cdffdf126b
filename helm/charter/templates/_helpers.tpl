{{/* Names, labels, images, the Charter environment and the pod pieces every workload shares. */}}

{{- define "charter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "charter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "charter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels; call with (dict "root" $ "component" "api"). */}}
{{- define "charter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "charter.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Standard labels on every object; call with (dict "root" $ "component" "api"). */}}
{{- define "charter.labels" -}}
helm.sh/chart: {{ include "charter.chart" .root }}
{{ include "charter.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: charter
{{- end -}}

{{- define "charter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "charter.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference; call with (dict "root" $ "image" .Values.image "defaultTag" "...").
global.imageRegistry (the air-gapped mirror) replaces the image's own registry; a digest
wins over the tag, so what runs is exactly what was mirrored.
*/}}
{{- define "charter.image" -}}
{{- $registry := .image.registry -}}
{{- with .root.Values.global.imageRegistry }}{{ $registry = . }}{{ end -}}
{{- $repo := .image.repository -}}
{{- if $registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" $registry) $repo }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .defaultTag .image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "charter.appImage" -}}
{{- include "charter.image" (dict "root" . "image" .Values.image "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{- define "charter.opaImage" -}}
{{- include "charter.image" (dict "root" . "image" .Values.opa.image "defaultTag" "") -}}
{{- end -}}

{{/* The Secrets the chart needs but never creates: fail with the value to set. */}}
{{- define "charter.requireSecrets" -}}
{{- $_ := required "database.existingSecret is required: name an existing Secret holding the PostgreSQL URL (the chart creates no secrets)" .Values.database.existingSecret -}}
{{- $_ = required "broker.existingSecret is required: name an existing Secret holding the Redis or RabbitMQ URL" .Values.broker.existingSecret -}}
{{- $_ = required "secretKey.existingSecret is required: name an existing Secret holding CHARTER_SECRET_KEY (32+ characters)" .Values.secretKey.existingSecret -}}
{{- $_ = required "audit.signingKeys.existingSecret is required: name an existing Secret holding Ed25519 PEM keys from `charter audit keygen`" .Values.audit.signingKeys.existingSecret -}}
{{- if .Values.oidc.enabled -}}
{{- $_ = required "oidc.issuer is required when oidc.enabled" .Values.oidc.issuer -}}
{{- $_ = required "oidc.clientId is required when oidc.enabled" .Values.oidc.clientId -}}
{{- $_ = required "oidc.audience is required when oidc.enabled" .Values.oidc.audience -}}
{{- $_ = required "oidc.existingSecret is required when oidc.enabled: name an existing Secret holding the client secret" .Values.oidc.existingSecret -}}
{{- $_ = required "config.publicUrl is required when oidc.enabled (the redirect URI is built from it)" .Values.config.publicUrl -}}
{{- end -}}
{{- end -}}

{{- define "charter.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/* The environment of `charter db upgrade`: the database and logging only. */}}
{{- define "charter.baseEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{ include "charter.secretEnv" (dict "name" "CHARTER_DATABASE_URL" "secret" .Values.database.existingSecret "key" .Values.database.urlKey) }}
- name: CHARTER_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: CHARTER_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
{{- end -}}

{{/* The environment of the API, worker and beat containers. */}}
{{- define "charter.env" -}}
{{ include "charter.baseEnv" . }}
{{ include "charter.secretEnv" (dict "name" "CHARTER_SECRET_KEY" "secret" .Values.secretKey.existingSecret "key" .Values.secretKey.key) }}
- name: CHARTER_DB_POOL_SIZE
  value: {{ .Values.database.poolSize | quote }}
- name: CHARTER_TASK_BACKEND
  value: celery
{{ include "charter.secretEnv" (dict "name" "CHARTER_BROKER_URL" "secret" .Values.broker.existingSecret "key" .Values.broker.urlKey) }}
{{- if .Values.limits.existingSecret }}
{{ include "charter.secretEnv" (dict "name" "CHARTER_LIMITS_REDIS_URL" "secret" .Values.limits.existingSecret "key" .Values.limits.urlKey) }}
{{- end }}
- name: CHARTER_LIMITS_UNAVAILABLE
  value: {{ .Values.limits.unavailable | quote }}
{{- with .Values.audit.siem.syslog }}
- name: CHARTER_AUDIT_SIEM_SYSLOG
  value: {{ . | quote }}
{{- end }}
{{- with .Values.audit.siem.otlp }}
- name: CHARTER_AUDIT_SIEM_OTLP
  value: {{ . | quote }}
{{- end }}
{{- if .Values.audit.siem.caConfigMap }}
- name: CHARTER_AUDIT_SIEM_CA_FILE
  value: {{ printf "/etc/charter/siem-ca/%s" .Values.audit.siem.caKey | quote }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- name: CHARTER_OTEL_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tokenizers.existingClaim }}
- name: CHARTER_TOKENIZERS_DIR
  value: {{ .Values.tokenizers.mountPath | quote }}
{{- end }}
{{- if .Values.captures.keySecret }}
- name: CHARTER_CAPTURE_KEY_FILE
  value: {{ printf "%s/%s" .Values.captures.mountPath .Values.captures.keyName | quote }}
{{- end }}
- name: CHARTER_CAPTURE_MAX_HOURS
  value: {{ .Values.captures.maxHours | quote }}
- name: CHARTER_CAPTURE_MAX_RETAIN_DAYS
  value: {{ .Values.captures.maxRetainDays | quote }}
- name: CHARTER_POLICY_BACKEND
  value: remote
- name: CHARTER_OPA_URL
  value: "http://127.0.0.1:8181"
- name: CHARTER_OPA_TIMEOUT_S
  value: {{ .Values.opa.timeoutSeconds | quote }}
- name: CHARTER_OPA_PUSH_POLICIES
  value: "false"
- name: CHARTER_POLICY_DIR
  value: /etc/charter/policies
{{- $hops := .Values.config.trustedProxyHops }}
{{- if eq (toString $hops) "<nil>" }}{{ $hops = ternary 1 0 .Values.ingress.enabled }}{{ end }}
- name: CHARTER_TRUSTED_PROXY_HOPS
  value: {{ $hops | quote }}
{{- with .Values.config.publicUrl }}
- name: CHARTER_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
- name: CHARTER_AUDIT_SIGNING_KEYS
  value: {{ $dir := .Values.audit.signingKeys.mountPath }}{{ $paths := list }}{{ range .Values.audit.signingKeys.files }}{{ $paths = append $paths (printf "%s/%s" $dir .) }}{{ end }}{{ join "," $paths | quote }}
{{- with .Values.config.auditLogOrigin }}
- name: CHARTER_AUDIT_LOG_ORIGIN
  value: {{ . | quote }}
{{- end }}
- name: CHARTER_AUDIT_RETENTION_DAYS
  value: {{ .Values.config.auditRetentionDays | quote }}
{{- if .Values.audit.checkpointStore.existingClaim }}
- name: CHARTER_AUDIT_CHECKPOINT_DIR
  value: {{ .Values.audit.checkpointStore.mountPath | quote }}
{{- end }}
{{- if .Values.audit.sealKey.existingClaim }}
- name: CHARTER_AUDIT_SEAL_KEY
  value: {{ printf "%s/%s" .Values.audit.sealKey.mountPath .Values.audit.sealKey.file | quote }}
{{- end }}
{{- with .Values.audit.witnesses }}
- name: CHARTER_AUDIT_WITNESSES
  value: {{ $ws := list }}{{ range . }}{{ $ws = append $ws (printf "%s %s" .key .url) }}{{ end }}{{ join "," $ws | quote }}
{{- end }}
{{- with .Values.config.nodeAllowedNetworks }}
- name: CHARTER_NODE_ALLOWED_NETWORKS
  value: {{ join "," . | quote }}
{{- end }}
{{- if .Values.oidc.enabled }}
- name: CHARTER_OIDC_ISSUER
  value: {{ .Values.oidc.issuer | quote }}
{{- with .Values.oidc.discoveryUrl }}
- name: CHARTER_OIDC_DISCOVERY_URL
  value: {{ . | quote }}
{{- end }}
- name: CHARTER_OIDC_CLIENT_ID
  value: {{ .Values.oidc.clientId | quote }}
- name: CHARTER_OIDC_AUDIENCE
  value: {{ .Values.oidc.audience | quote }}
{{ include "charter.secretEnv" (dict "name" "CHARTER_OIDC_CLIENT_SECRET" "secret" .Values.oidc.existingSecret "key" .Values.oidc.clientSecretKey) }}
- name: CHARTER_OIDC_GROUPS_CLAIM
  value: {{ .Values.oidc.groupsClaim | quote }}
{{- with .Values.oidc.roleMap }}
- name: CHARTER_OIDC_ROLE_MAP
  value: {{ toJson . | quote }}
{{- end }}
{{- with .Values.oidc.teamMap }}
- name: CHARTER_OIDC_TEAM_MAP
  value: {{ toJson . | quote }}
{{- end }}
{{- end }}
{{- range $name, $value := .Values.config.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "charter.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "charter.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "charter.imagePullSecrets" -}}
imagePullSecrets:
{{- range .Values.global.imagePullSecrets }}
  - name: {{ . }}
{{- end }}
{{- end -}}

{{/*
The policy files as the chart carries them: a dict of bundle path -> content, with
policies.data replacing whole data documents.
*/}}
{{- define "charter.policyFiles" -}}
{{- $files := dict -}}
{{- range $path, $_ := .Files.Glob "files/policies/**" -}}
{{- $rel := trimPrefix "files/policies/" $path -}}
{{- $_ := set $files $rel ($.Files.Get $path) -}}
{{- end -}}
{{- range $name, $doc := .Values.policies.data -}}
{{- $_ := set $files (printf "data/%s.json" $name) (toJson $doc) -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/* A ConfigMap key for a bundle path (keys cannot hold slashes). */}}
{{- define "charter.policyKey" -}}
{{- . | replace "/" "__" -}}
{{- end -}}

{{/*
The policy revision, computed exactly as Charter computes it (charter/policy/bundle.py):
SHA-256 over each policy's path, NUL, source, NUL in path order, then the data document
{"charter": {<name>: ...}} as compact JSON with sorted keys. OPA holds it as
data.charter.revision and Charter refuses to decide when it differs from its own.
*/}}
{{- define "charter.policyRevision" -}}
{{- $files := include "charter.policyFiles" . | fromJson -}}
{{- $nul := printf "%c" 0 -}}
{{- $buf := "" -}}
{{- range $path := keys $files | sortAlpha -}}
{{- if hasSuffix ".rego" $path -}}
{{- $buf = printf "%s%s%s%s%s" $buf $path $nul (get $files $path) $nul -}}
{{- end -}}
{{- end -}}
{{- $data := dict -}}
{{- range $path, $content := $files -}}
{{- if hasPrefix "data/" $path -}}
{{- $_ := set $data (trimSuffix ".json" (trimPrefix "data/" $path)) ($content | mustFromJson) -}}
{{- end -}}
{{- end -}}
{{- printf "sha256:%s" (sha256sum (printf "%s%s" $buf (toJson (dict "charter" $data)))) -}}
{{- end -}}

{{/* The policy volume; OPA's and Charter's containers each mount its files by subPath. */}}
{{- define "charter.policyVolume" -}}
- name: policies
  configMap:
    name: {{ include "charter.fullname" . }}-policies
{{- end -}}

{{/* Charter's layout: the Rego files under charter/ and data/<name>.json under /etc/charter/policies. */}}
{{- define "charter.policyMounts" -}}
{{- $files := include "charter.policyFiles" . | fromJson -}}
{{- range $path := keys $files | sortAlpha }}
- name: policies
  mountPath: /etc/charter/policies/{{ $path }}
  subPath: {{ include "charter.policyKey" $path }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* OPA's layout: the Rego as is, data/<name>.json as charter/<name>/data.json, the revision. */}}
{{- define "charter.opaPolicyMounts" -}}
{{- $files := include "charter.policyFiles" . | fromJson -}}
{{- range $path := keys $files | sortAlpha }}
{{- if not (hasPrefix "schemas/" $path) }}{{/* the input contracts are Charter's, not OPA's */}}
- name: policies
  {{- if hasPrefix "data/" $path }}
  mountPath: /policies/charter/{{ trimSuffix ".json" (trimPrefix "data/" $path) }}/data.json
  {{- else }}
  mountPath: /policies/{{ $path }}
  {{- end }}
  subPath: {{ include "charter.policyKey" $path }}
  readOnly: true
{{- end }}
{{- end }}
- name: policies
  mountPath: /policies/charter/data.json
  subPath: revision.json
  readOnly: true
{{- end -}}

{{/* The OPA sidecar: the REST API on 127.0.0.1 only; health on the diagnostic port. */}}
{{- define "charter.opaContainer" -}}
- name: opa
  image: {{ include "charter.opaImage" . }}
  imagePullPolicy: {{ .Values.opa.image.pullPolicy }}
  args:
    - run
    - --server
    - --addr=127.0.0.1:8181
    - --diagnostic-addr=0.0.0.0:8282
    - --disable-telemetry
    - --log-level={{ .Values.opa.logLevel }}
    - --log-format=json
    - --ignore=.*
    - /policies
  ports:
    - name: opa-diag
      containerPort: 8282
      protocol: TCP
  readinessProbe:
    httpGet:
      path: /health
      port: opa-diag
    periodSeconds: 5
  livenessProbe:
    httpGet:
      path: /health
      port: opa-diag
    periodSeconds: 10
    failureThreshold: 6
  securityContext:
    {{- include "charter.containerSecurityContext" . | nindent 4 }}
  resources:
    {{- toYaml .Values.opa.resources | nindent 4 }}
  volumeMounts:
    {{- include "charter.opaPolicyMounts" . | trim | nindent 4 }}
{{- end -}}

{{/* Mounts of the Charter containers: /tmp, the policies, the signing keys, the store. */}}
{{- define "charter.appMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.audit.siem.caConfigMap }}
- name: siem-ca
  mountPath: /etc/charter/siem-ca
  readOnly: true
{{- end }}
{{- include "charter.policyMounts" . }}
- name: signing-keys
  mountPath: {{ .Values.audit.signingKeys.mountPath }}
  readOnly: true
{{- if .Values.audit.checkpointStore.existingClaim }}
- name: checkpoints
  mountPath: {{ .Values.audit.checkpointStore.mountPath }}
{{- end }}
{{- if .Values.audit.sealKey.existingClaim }}
- name: seal-key
  mountPath: {{ .Values.audit.sealKey.mountPath }}
{{- end }}
{{- if .Values.tokenizers.existingClaim }}
- name: tokenizers
  mountPath: {{ .Values.tokenizers.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.captures.keySecret }}
- name: capture-key
  mountPath: {{ .Values.captures.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "charter.appVolumes" -}}
# On disk, not in memory: uploads and audit exports spool through temporary files.
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
{{- if .Values.audit.siem.caConfigMap }}
- name: siem-ca
  configMap:
    name: {{ .Values.audit.siem.caConfigMap }}
    items:
      - key: {{ .Values.audit.siem.caKey }}
        path: {{ .Values.audit.siem.caKey }}
{{- end }}
{{ include "charter.policyVolume" . }}
- name: signing-keys
  secret:
    secretName: {{ .Values.audit.signingKeys.existingSecret }}
    defaultMode: 0440
    items:
{{- range .Values.audit.signingKeys.files }}
      - key: {{ . }}
        path: {{ . }}
{{- end }}
{{- with .Values.audit.checkpointStore.existingClaim }}
- name: checkpoints
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- with .Values.audit.sealKey.existingClaim }}
- name: seal-key
  persistentVolumeClaim:
    claimName: {{ . }}
{{- end }}
{{- with .Values.captures.keySecret }}
- name: capture-key
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ $.Values.captures.keyName }}
        path: {{ $.Values.captures.keyName }}
{{- end }}
{{- with .Values.tokenizers.existingClaim }}
- name: tokenizers
  persistentVolumeClaim:
    claimName: {{ . }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Restart pods when the policies change (subPath mounts do not follow ConfigMap edits). */}}
{{- define "charter.podAnnotations" -}}
checksum/policies: {{ include "charter.policyRevision" . | trimPrefix "sha256:" | quote }}
{{- end -}}
