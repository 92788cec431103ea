-- UserInfo with the access token of a full login in the Authorization header.
-- BENCH_TOKEN: the access token (obtained just before the round; lifetime 1 h).
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
