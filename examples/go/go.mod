module example.com/aiwfd-client

go 1.19
