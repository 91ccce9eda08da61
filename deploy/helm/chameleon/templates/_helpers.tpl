{{- define "chameleon.name" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "chameleon.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "chameleon.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chameleon.image" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{/* Where the index volume is mounted. */}}
{{- define "chameleon.data" -}}/var/lib/chameleon/data{{- end -}}

{{- define "chameleon.curveArgs" -}}
{{- if .Values.curveKeys.secretName }}
- --keys
- /etc/chameleon/keys
{{- end }}
{{- end -}}

{{/* The CURVE keys Secret as the directory `chameleon keys gen` writes (client.key authorised). */}}
{{- define "chameleon.curveVolume" -}}
{{- if .Values.curveKeys.secretName }}
- name: keys
  secret:
    secretName: {{ .Values.curveKeys.secretName }}
    defaultMode: 0400
    items:
      - {key: server.key_secret, path: server.key_secret}
      - {key: client.key_secret, path: client.key_secret}
      - {key: client.key, path: authorized/client.key}
{{- end }}
{{- end -}}

{{- define "chameleon.curveMount" -}}
{{- if .Values.curveKeys.secretName }}
- {name: keys, mountPath: /etc/chameleon/keys, readOnly: true}
{{- end }}
{{- end -}}

{{/* The pod-level security every tier shares: the images' unprivileged user. */}}
{{- define "chameleon.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  fsGroup: 10001
{{- end -}}

{{/* The index layouts the retrieval tier runs, as JSON: [{version, shards}], the current one first
and, while a change rolls out (index.previous), the one it replaces. */}}
{{- define "chameleon.layouts" -}}
{{- $index := .Values.index }}
{{- $layouts := list (dict "version" $index.version "shards" (int $index.shards)) }}
{{- with $index.previous }}
{{- if or .version .shards }}
{{- $previous := dict "version" (.version | default $index.version) "shards" (int (.shards | default $index.shards)) }}
{{- if ne (toJson $previous) (toJson (first $layouts)) }}
{{- $layouts = append $layouts $previous }}
{{- end }}
{{- end }}
{{- end }}
{{- range $layouts }}
{{- include "chameleon.checkVersion" .version }}
{{- end }}
{{- toJson $layouts }}
{{- end -}}

{{/* An index version's name becomes a directory and a part of object names and labels. */}}
{{- define "chameleon.checkVersion" -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?$" (toString .)) }}
{{- fail (printf "index version %q: use lowercase letters, digits and '-' (at most 16 characters, a letter or digit at each end)" (toString .)) }}
{{- end }}
{{- end -}}

{{/* "true" when the index is a vector index (index.vectors.file): no passages, so no server. */}}
{{- define "chameleon.vectorMode" -}}
{{- if .Values.index.vectors.file }}true{{ else }}false{{ end }}
{{- end -}}

{{/* The current version's index that coordinators read, as the link names it. */}}
{{- define "chameleon.served" -}}
{{ include "chameleon.data" . }}/current/{{ if eq (include "chameleon.vectorMode" .) "true" }}vectors{{ else }}rag/index{{ end }}
{{- end -}}

{{/* A shell loop until a file another Job writes is there: (list PATH SECONDS WHO). Jobs start in
no order; a part of a build waits for the one before it, and gives up with a reason. */}}
{{- define "chameleon.waitFor" -}}
{{- $path := index . 0 }}{{ $seconds := int (index . 1) }}
{{- printf "waited=0; until test -f %s; do test $waited -lt %d || { echo \"no %s after %d s: did %s fail?\" >&2; exit 1; }; sleep 5; waited=$((waited+5)); done" $path $seconds $path $seconds (index . 2) }}
{{- end -}}

{{/* A step of a vector build in parts: (dict "root" . "step" NAME "image" IMAGE "script" SH ["parts" N]),
a Job named by the version and step; with parts, an Indexed Job of that many pods. */}}
{{- define "chameleon.buildJob" -}}
{{- $root := .root }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ printf "%s-index-%s-%s" (include "chameleon.name" $root) $root.Values.index.version .step | trunc 63 | trimSuffix "-" }}
  labels: {{- include "chameleon.labels" $root | nindent 4 }}
    app.kubernetes.io/component: index
spec:
  backoffLimit: 3
  {{- with .parts }}
  completionMode: Indexed
  completions: {{ . }}
  parallelism: {{ $root.Values.index.vectors.parallelism | default . }}
  {{- end }}
  template:
    metadata:
      labels: {{- include "chameleon.selector" $root | nindent 8 }}
        app.kubernetes.io/component: index
    spec:
      restartPolicy: OnFailure
      {{- include "chameleon.podSecurity" $root | nindent 6 }}
      containers:
        - name: {{ .step }}
          image: {{ include "chameleon.image" .image }}
          imagePullPolicy: {{ .image.pullPolicy }}
          workingDir: {{ include "chameleon.data" $root }}
          command: ["sh", "-c"]
          args: [{{ printf "set -e; %s" .script | quote }}]
          {{- with $root.Values.index.resources }}
          resources: {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - {name: index, mountPath: {{ include "chameleon.data" $root }}}
      volumes:
        - name: index
          persistentVolumeClaim:
            claimName: {{ include "chameleon.name" $root }}-index
{{- end -}}
