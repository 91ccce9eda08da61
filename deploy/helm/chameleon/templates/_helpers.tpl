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
