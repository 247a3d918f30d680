-- pgbench script for bench/run.sh: the minimum durable write per push, one INSERT of a
-- history row the size of a real one (about 1.5 KB of JSON: the caller's request, the
-- body sent to Umeng and Umeng's answer) into the gateway's own `pushes` table, indexes
-- included, in its own transaction (autocommit). pgbench takes a colon followed by a name as a variable, so the JSON has none.
-- The id is UUIDv7-shaped text of now, like the gateway's: time-ordered, so each insert goes
-- to the right edge of the primary key as the gateway's do (a random UUID lands anywhere).
\set n random(1, 1000000000)
\set r random(0, 281474976710655)
insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode, client,
                    out_biz_no, fingerprint, status, description, request, umeng_request,
                    umeng_response, msg_id, http_status, latency_ms, sent_at, finished_at)
values ((select lpad(to_hex(m >> 16), 8, '0') || '-' || lpad(to_hex(m & 65535), 4, '0')
                 || '-7000-8000-' || lpad(to_hex(:r::bigint), 12, '0')
            from (select (extract(epoch from clock_timestamp()) * 1000)::bigint as m) as now_ms),
        'bench-unicast', '5f00000000000000000b0001', 'android', 'unicast',
        false, false, 'bench', 'order-' || :client_id || '-' || :n,
        md5(random()::text) || md5(random()::text), 'accepted', 'order shipped',
        '{"app":"bench-unicast","type":"unicast","device_tokens":["AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv"],"notification":{"title":"Your order shipped","text":"Order 42 is on its way, it should arrive on Thursday between 9 am and noon","open":{"url":"https://shop.example/orders/42?utm_source=push&utm_medium=app"},"extra":{"order":"42","shipment":"SF1234567890","carrier":"sf-express"}},"policy":{"expire_time":"2026-12-01T01Z"},"out_biz_no":"order-42-shipped","production_mode": true,"description":"order shipped"}'::jsonb,
        '{"appkey":"5f00000000000000000b0001","timestamp":"1767225600000","type":"unicast","device_tokens":"AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv","payload":{"display_type":"notification","body":{"ticker":"Your order shipped","title":"Your order shipped","text":"Order 42 is on its way, it should arrive on Thursday between 9 am and noon","after_open":"go_url","url":"https://shop.example/orders/42?utm_source=push&utm_medium=app"},"extra":{"order":"42","shipment":"SF1234567890","carrier":"sf-express"}},"policy":{"expire_time":"2026-12-01 09h","out_biz_no":"order-42-shipped"},"production_mode":"true","description":"order shipped"}'::jsonb,
        '{"ret":"SUCCESS","data":{"msg_id":"uu12345678901234567890"}}'::jsonb,
        'uu12345678901234567890', 201, 3, now(), now());
