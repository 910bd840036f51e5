{{- define "kvfold.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvfold.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvfold.labels" -}}
{{ include "kvfold.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kvfold.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvfold.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvfold.modelPath" -}}
{{- if eq .Values.model.source "pvc" -}}
{{- if .Values.model.pvc.subPath -}}
{{- printf "%s/%s" .Values.model.pvc.mountPath .Values.model.pvc.subPath -}}
{{- else -}}
{{- .Values.model.pvc.mountPath -}}
{{- end -}}
{{- else -}}
{{- .Values.model.path -}}
{{- end -}}
{{- end -}}

{{/* The kvfold method that serves: the backend, or options.method under CUSTOM (kvfold's own
     spelling rules: "treekv" and "KVFOLD_TREEKV" name the same method). */}}
{{- define "kvfold.method" -}}
{{- if eq .Values.kvfold.backend "CUSTOM" -}}
{{- $m := upper (toString (default "" .Values.kvfold.options.method)) -}}
{{- if hasPrefix "KVFOLD_" $m }}{{ $m }}{{ else }}{{ printf "KVFOLD_%s" $m }}{{ end -}}
{{- else -}}
{{- .Values.kvfold.backend -}}
{{- end -}}
{{- end -}}

{{/* Methods whose blocks prefix caching cannot share (their backend's prefix_caching_refusal):
     vLLM enables prefix caching by default, and kvfold refuses it at start-up for these. */}}
{{- define "kvfold.refusesPrefixCaching" -}}
{{- if has (include "kvfold.method" .) (list "KVFOLD_TREEKV" "KVFOLD_VQKV" "KVFOLD_FOURIER") }}true{{ end -}}
{{- end -}}
