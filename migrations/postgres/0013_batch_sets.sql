-- Group commit with set statements for the common rows. The batch functions of 0010 ran
-- each row through its own statements (for an admission, a call of umgw_admit and its
-- insert; for an outcome record, a read and a guarded update), and each statement starts
-- an executor over `pushes` and its indexes: most of PostgreSQL's time per push. Now:
--
-- - admissions without a quota slot (unicast, listcast, ...) claim their keys with one
--   insert and are inserted with one more, as umgw_admit inserts them; the others (a
--   quota slot to take, or a key that someone holds already) still go through umgw_admit
--   one at a time, in the order given;
-- - outcome records that keep their quota slot (`keep`, every outcome of a push without a
--   slot) are applied by one guarded update; refunds and saturations, which move a
--   counter, still go one at a time.
--
-- The answers are the same as before, row for row. Hash and merge joins are off so that
-- the batch always meets `pushes` through its primary key, whatever the statistics said
-- when PL/pgSQL cached the plan; JIT is off as for the claim (a batch is never worth
-- compiling).

create or replace function umgw_admit_batch(p_rows jsonb)
returns table (
    idx              integer,
    outcome          text,
    push_id          text,
    reclaimed_from   text,
    used             integer,
    window_start     bigint,
    reset_after_secs bigint
)
language plpgsql
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
#variable_conflict use_column
declare
    r      record;
    a      record;
    v_done integer[];
begin
    -- Rows without a quota slot: their keys claimed together (in key order, so that two
    -- batches wait for each other's keys in the same order), then every row without a key
    -- or with its key claimed inserted together, as umgw_admit (0008) inserts it. A key
    -- already held is left to umgw_admit below, which finds out who holds it.
    with t as (
        select (o.ord - 1)::integer as i, o.v
          from jsonb_array_elements(p_rows) with ordinality as o(v, ord)
         where o.v ->> 'quota_kind' is null
    ), k as (
        insert into idempotency_keys (appkey, out_biz_no, fingerprint, push_id)
        select t.v ->> 'appkey', t.v ->> 'out_biz_no', t.v ->> 'fingerprint', t.v ->> 'id'
          from t
         where t.v ->> 'out_biz_no' is not null
         order by 1, 2
        on conflict (appkey, out_biz_no) do nothing
        returning push_id
    ), ok as (
        select t.i, t.v from t where t.v ->> 'out_biz_no' is null
        union all
        select t.i, t.v from t join k on k.push_id = t.v ->> 'id'
    ), ins as (
        insert into pushes (id, app, appkey, platform, cast_type, task_class, production_mode,
                            client, out_biz_no, fingerprint, status, description, request,
                            delivery, outbox, next_attempt_at, send_at, deliver_by, quota_wait)
        select ok.v ->> 'id', ok.v ->> 'app', ok.v ->> 'appkey', ok.v ->> 'platform',
               ok.v ->> 'cast_type', (ok.v ->> 'task_class')::boolean,
               (ok.v ->> 'production_mode')::boolean, ok.v ->> 'client', ok.v ->> 'out_biz_no',
               ok.v ->> 'fingerprint', ok.v ->> 'status', ok.v ->> 'description',
               ok.v -> 'request',
               case when ok.v ->> 'status' = 'pending' then null else 'async' end,
               case when jsonb_typeof(ok.v -> 'outbox') = 'null' then null
                    else ok.v -> 'outbox' end,
               case when ok.v ->> 'status' = 'pending' then null
                    when ok.v ->> 'status' = 'awaiting_send_at'
                        then (ok.v ->> 'send_at')::timestamptz
                    else now() end,
               (ok.v ->> 'send_at')::timestamptz, (ok.v ->> 'deliver_by')::timestamptz,
               coalesce((ok.v ->> 'quota_wait')::boolean, false)
          from ok
    )
    select coalesce(array_agg(ok.i), '{}') into v_done from ok;

    return query
    select d, 'admitted'::text, p_rows -> d ->> 'id', null::text, null::integer,
           null::bigint, null::bigint
      from unnest(v_done) as d;

    -- The others (a quota slot, or a key held already) one at a time, in the order given.
    for r in
        select (o.ord - 1)::integer as i, o.v
          from jsonb_array_elements(p_rows) with ordinality as o(v, ord)
         where not ((o.ord - 1)::integer = any (v_done))
         order by o.ord
    loop
        select * into a from umgw_admit(
            r.v ->> 'id', r.v ->> 'app', r.v ->> 'appkey', r.v ->> 'platform',
            r.v ->> 'cast_type', (r.v ->> 'task_class')::boolean,
            (r.v ->> 'production_mode')::boolean, r.v ->> 'client', r.v ->> 'out_biz_no',
            r.v ->> 'fingerprint', r.v -> 'request', r.v ->> 'description',
            r.v ->> 'quota_kind', (r.v ->> 'quota_limit')::integer,
            (r.v ->> 'quota_unit')::bigint, r.v ->> 'status',
            (r.v ->> 'defer_quota')::boolean,
            case when jsonb_typeof(r.v -> 'outbox') = 'null' then null else r.v -> 'outbox' end,
            (r.v ->> 'send_at')::timestamptz, (r.v ->> 'deliver_by')::timestamptz,
            (r.v ->> 'quota_wait')::boolean);
        idx := r.i;
        outcome := a.outcome;
        push_id := a.push_id;
        reclaimed_from := a.reclaimed_from;
        used := a.used;
        window_start := a.window_start;
        reset_after_secs := a.reset_after_secs;
        return next;
    end loop;
end
$$;

-- One outcome record of a batch, as the caller sends it (a JSON object per row).
create type umgw_finish_row as (
    id text, status text, umeng_request jsonb, umeng_response jsonb, msg_id text,
    task_id text, file_id text, error_code text, error_msg text, http_status integer,
    latency_ms bigint, sent_at timestamptz, action text, unit bigint, attempts jsonb,
    claim integer
);

create or replace function umgw_finish_batch(p_rows jsonb)
returns setof text
language plpgsql
set enable_hashjoin = off
set enable_mergejoin = off
set jit = off
as $$
#variable_conflict use_column
declare
    r          record;
    v_was      boolean;
    v_appkey   text;
    v_kind     text;
    v_window   bigint;
    v_limit    integer;
begin
    -- Outcomes that keep the slot: one guarded update (the guard of the loop below). The
    -- caller never puts two outcomes of one push into a batch.
    return query
    with v as (
        select * from jsonb_populate_recordset(null::umgw_finish_row, p_rows) as v
         where v.action = 'keep'
    ), u as (
        update pushes p
           set status = v.status, umeng_request = v.umeng_request,
               umeng_response = v.umeng_response, msg_id = v.msg_id, task_id = v.task_id,
               file_id = v.file_id, error_code = v.error_code, error_msg = v.error_msg,
               http_status = v.http_status, latency_ms = v.latency_ms, sent_at = v.sent_at,
               attempts = coalesce(v.attempts, '[]'::jsonb),
               outbox = null, next_attempt_at = null, deliver_lease_until = null,
               finished_at = now(), updated_at = now()
          from v
         where p.id = v.id
           and (v.claim is null or p.deliver_claims = v.claim)
           and (p.status = 'pending'
                or (p.status = 'unknown' and p.error_code = 'stale_pending'
                    and (p.out_biz_no is null
                         or exists (select 1 from idempotency_keys k where k.push_id = p.id))))
        returning p.id
    )
    select u.id from u;

    -- Refunds and saturations, one at a time: two refunds of one window are two decrements.
    for r in
        select * from jsonb_populate_recordset(null::umgw_finish_row, p_rows) as v
         where v.action is distinct from 'keep'
    loop
        select p.quota_refunded into v_was from pushes p where p.id = r.id;
        update pushes p
           set status = r.status, umeng_request = r.umeng_request,
               umeng_response = r.umeng_response, msg_id = r.msg_id, task_id = r.task_id,
               file_id = r.file_id, error_code = r.error_code, error_msg = r.error_msg,
               http_status = r.http_status, latency_ms = r.latency_ms, sent_at = r.sent_at,
               attempts = coalesce(r.attempts, '[]'::jsonb),
               quota_refunded = p.quota_refunded
                   or (r.action = 'refund' and p.quota_window is not null),
               outbox = null, next_attempt_at = null, deliver_lease_until = null,
               finished_at = now(), updated_at = now()
         where p.id = r.id
           and (r.claim is null or p.deliver_claims = r.claim)
           and (p.status = 'pending'
                or (p.status = 'unknown' and p.error_code = 'stale_pending'
                    and (p.out_biz_no is null
                         or exists (select 1 from idempotency_keys k where k.push_id = p.id))))
        returning p.appkey, p.quota_kind, p.quota_window, p.quota_limit
             into v_appkey, v_kind, v_window, v_limit;
        if not found then
            continue;
        end if;
        if r.action = 'refund' and not v_was and v_window is not null then
            update quota_counters c
               set used = greatest(c.used - 1, 0)
             where c.appkey = v_appkey and c.kind = v_kind and c.window_start = v_window;
        elsif r.action = 'saturate' and v_kind is not null and v_limit is not null then
            insert into quota_counters as c (appkey, kind, window_start, used)
            values (v_appkey, v_kind,
                    (floor((extract(epoch from now()) + 28800) / r.unit) * r.unit - 28800)::bigint,
                    v_limit)
            on conflict (appkey, kind, window_start)
            do update set used = greatest(c.used, excluded.used);
        end if;
        return next r.id;
    end loop;
end
$$;
