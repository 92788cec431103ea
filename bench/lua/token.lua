-- client_credentials at the token endpoint, client_secret_basic.
-- BENCH_BASIC: the whole Authorization header value ("Basic ...").
dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
wrk.method = "POST"
wrk.body = "grant_type=client_credentials"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = os.getenv("BENCH_BASIC")
