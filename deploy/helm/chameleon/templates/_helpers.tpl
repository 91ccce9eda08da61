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
