module batchinfer.dev/pause

go 1.22
