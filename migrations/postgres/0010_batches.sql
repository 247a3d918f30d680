-- Outcome records of concurrent pushes in one call (group commit): each row is applied as
-- the single-row finish is (guarded: still `pending`, or the sweeper's `unknown` guess for
-- a push that owns its key; the delivery claim's fencing token), with its own quota action.
-- The statements run one row at a time inside the function, so two refunds of one window
-- are two decrements; plans are cached by PL/pgSQL, so a batch costs no planning.
-- Returns the ids that changed.
create function umgw_finish_batch(p_rows jsonb)
returns setof text
language plpgsql
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
    for r in
        select * from jsonb_to_recordset(p_rows) as v(
            id text, status text, umeng_request jsonb, umeng_response jsonb, msg_id text,
            task_id text, file_id text, error_code text, error_msg text, http_status integer,
            latency_ms bigint, sent_at timestamptz, action text, unit bigint, attempts jsonb,
            claim integer)
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

-- Admissions of concurrent pushes in one call (group commit): umgw_admit for each row, in
-- the order given (the caller sorts by appkey and bucket, so two batches take counter rows
-- in the same order). Any error aborts the whole batch; the caller then admits each push
-- alone. Returns one row per input row, `idx` its position (0-based).
create function umgw_admit_batch(p_rows jsonb)
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
as $$
#variable_conflict use_column
declare
    r record;
    a record;
begin
    for r in
        select (t.ord - 1)::integer as i, t.v
          from jsonb_array_elements(p_rows) with ordinality as t(v, ord)
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
