-- The delivery claim of 0014 again, reading `pushes` only through its indexes.
--
-- 0016 rewrote the claim to lock only the pushes it takes and to mark them with one
-- `update ... where p.id = any (v_ids)`. Two things were found in the bench:
--
-- - A PL/pgSQL function keeps the plans of its statements for the session, and from the
--   sixth call on may keep a generic plan, made without knowing the array: it guesses ten
--   ids, and while the queue is a few pages long a sequential scan is the cheaper way to
--   find ten rows. The worker's first claims run while the queue is small, and it claims
--   on a session it keeps, so that plan stayed: every later claim read the whole table,
--   and in two runs of three the bench's queue of 45,000 pushes took 60-90 s to drain
--   instead of 20.
-- - With that plan ruled out, 0016 still cost more than 0014 with an 80 ms upstream, where
--   a claim takes one or two pushes: more PostgreSQL CPU per accepted push and a lower
--   intake in each of four same-machine pairs (BENCHMARKS.md). Its gain with an instant
--   upstream was within the runs' spread.
--
-- So the body of 0014 is back. A statement that finds one push by `id` has the same
-- weakness as the update above on a table of one page, and every statement of the
-- function has an index to use: sequential scans are off for it, as sorts are (0011). A
-- migration that replaces the function must set `enable_seqscan = off` again (the store
-- tests check the current version), beside `enable_sort = off` and `jit = off`.

create or replace function umgw_claim_deliveries(
    p_limit      integer,
    p_lease_ms   bigint,
    p_apps       text[],
    p_appkeys    text[],
    p_app_limits integer[],
    p_due_from   timestamptz[]
)
returns table (
    id text, claims integer, lease_until timestamptz, app text, appkey text, cast_type text,
    task_class boolean, production_mode boolean, out_biz_no text, outbox jsonb,
    attempts jsonb, created_at timestamptz, deliver_by timestamptz, quota_kind text,
    quota_wait boolean, parent_id text, due_at timestamptz
)
language plpgsql
set enable_sort = off
set enable_seqscan = off
set jit = off
as $$
#variable_conflict use_column
declare
    r          record;
    v_taken    integer[] := array_fill(0, array[greatest(coalesce(array_length(p_apps, 1), 0), 1)]);
    v_idx      integer;
    v_claimed  integer := 0;
    v_epoch    double precision := extract(epoch from now());
    v_window   bigint;
    v_used     integer;
    v_head     timestamptz;
    v_wait     timestamptz;
    v_older    integer;
    v_free     integer;
begin
    for r in
        select d.*
          from unnest(p_apps, p_appkeys, p_app_limits, p_due_from)
               as c(app, appkey, cap, due_from)
          cross join lateral (
                select p.id, p.app, p.status, p.appkey, p.quota_kind, p.quota_limit,
                       p.quota_unit, p.quota_window, p.quota_refunded, p.quota_wait,
                       p.deliver_by, p.created_at, p.deliver_claims, p.next_attempt_at
                  from pushes p
                 where p.app = c.app and p.appkey = c.appkey
                   and p.status in ('awaiting_send', 'awaiting_send_at', 'awaiting_quota')
                   and p.next_attempt_at <= now()
                   and p.next_attempt_at >= coalesce(c.due_from, '-infinity')
                 order by p.next_attempt_at, p.created_at, p.id
                 limit greatest(least(c.cap, p_limit), 1) * 4
                   for update of p skip locked) d
         order by d.next_attempt_at, d.created_at, d.id
    loop
        exit when v_claimed >= p_limit;
        v_idx := array_position(p_apps, r.app);
        continue when v_idx is null or v_taken[v_idx] >= p_app_limits[v_idx];

        if r.deliver_by is not null and r.deliver_by <= now() then
            with f as (
                update pushes p
                   set status = 'failed',
                       error_code = case when r.status = 'awaiting_quota'
                                         then 'quota_wait_expired' else 'delivery_expired' end,
                       error_msg = case when r.status = 'awaiting_quota'
                           then 'no quota slot came free before the push''s deadline'
                           else 'the push could not be sent before its deadline' end,
                       http_status = case when r.status = 'awaiting_quota' then 429 else 504 end,
                       quota_refunded = p.quota_refunded or p.quota_window is not null,
                       outbox = null, next_attempt_at = null,
                       finished_at = now(), updated_at = now()
                 where p.id = r.id
             returning p.appkey, p.quota_kind, p.quota_window, r.quota_refunded as was_refunded
            )
            update quota_counters c
               set used = greatest(c.used - 1, 0)
              from f
             where not f.was_refunded and f.quota_window is not null
               and c.appkey = f.appkey and c.kind = f.quota_kind
               and c.window_start = f.quota_window;
            continue;
        end if;

        if r.quota_kind is not null and (r.quota_window is null or r.quota_refunded) then
            v_window := (floor((v_epoch + 28800) / r.quota_unit) * r.quota_unit - 28800)::bigint;
            v_wait := least(to_timestamp(v_window + r.quota_unit), coalesce(r.deliver_by, 'infinity'));
            -- An older push of the bucket, due, that another claim holds (a lock this
            -- claim's key share cannot take) is about to take a slot: this one does not
            -- overtake it, and stays as it is for a later claim.
            with older as (
                select q.id
                  from pushes q
                 where q.status in ('awaiting_send', 'awaiting_send_at')
                   and q.quota_kind is not null
                   and q.appkey = r.appkey and q.quota_kind = r.quota_kind
                   and (q.created_at, q.id) < (r.created_at, r.id)
                   and q.next_attempt_at <= now()
                   and (q.quota_window is null or q.quota_refunded)
            ), free as (
                select p.id
                  from pushes p
                 where p.id in (select id from older)
                   for key share of p skip locked
            )
            select (select count(*) from older), (select count(*) from free)
              into v_older, v_free;
            continue when v_free < v_older;
            -- First come, first served: behind an older push waiting for this bucket.
            select min(q.next_attempt_at) into v_head
              from pushes q
             where q.status = 'awaiting_quota' and q.appkey = r.appkey
               and q.quota_kind = r.quota_kind
               and (q.created_at, q.id) < (r.created_at, r.id);
            if v_head is not null then
                v_used := null;
                v_wait := greatest(v_head, now());
            else
                v_used := umgw_take_slot(r.appkey, r.quota_kind, v_window, r.quota_limit);
            end if;
            if v_used is null then
                if r.quota_wait or r.deliver_claims > 0 then
                    update pushes p
                       set status = 'awaiting_quota', next_attempt_at = v_wait,
                           updated_at = now()
                     where p.id = r.id;
                else
                    update pushes p
                       set status = 'failed', error_code = 'quota_exhausted',
                           error_msg = 'the ' || r.quota_kind || ' quota window was full when the push was due',
                           http_status = 429, outbox = null, next_attempt_at = null,
                           finished_at = now(), updated_at = now()
                     where p.id = r.id;
                end if;
                continue;
            end if;
            update pushes p
               set quota_window = v_window, quota_refunded = false
             where p.id = r.id;
        end if;

        v_taken[v_idx] := v_taken[v_idx] + 1;
        v_claimed := v_claimed + 1;
        return query
            update pushes p
               set status = 'pending', deliver_claims = p.deliver_claims + 1,
                   deliver_lease_until = now() + p_lease_ms * interval '1 millisecond',
                   updated_at = now()
             where p.id = r.id
         returning p.id, p.deliver_claims, p.deliver_lease_until, p.app, p.appkey,
                   p.cast_type, p.task_class, p.production_mode, p.out_biz_no, p.outbox,
                   p.attempts, p.created_at, p.deliver_by, p.quota_kind, p.quota_wait,
                   p.parent_id, p.next_attempt_at;
    end loop;
end
$$;
